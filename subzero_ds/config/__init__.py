"""A DeepSpeed JSON config with a ``"subzero"`` section, parsed once into two typed views.

- ``subzero.py``: the ``"subzero"`` section (:class:`SubZeroConfig`: the keys every method has,
  plus the method's and the update rule's own, declared in their files);
- ``deepspeed.py``: the DeepSpeed settings a ZO run reads (:class:`DeepSpeedSettings`: precision,
  stage, offload, accumulation, batch sizes), and DeepSpeed's own parser as a validator;
- ``environment.py``: what this machine can do for them (precisions, libaio, NVMe paths);
- ``loading.py``: reading the JSON file.

Every problem is collected and reported at once in one :class:`ConfigError`, each naming the key,
the bad value and the fix.
"""

from __future__ import annotations

from typing import Any, Mapping

from .deepspeed import DeepSpeedSettings, Precision, deepspeed_accepts, deepspeed_section, parse_deepspeed
from .environment import unsupported_precision
from .errors import SECTION, ConfigError, raise_problems, shown
from .loading import load_ds_config
from .subzero import ReplicaMode, SubZeroConfig, UpdateRounding, parse_section

__all__ = ["SECTION", "ConfigError", "DeepSpeedSettings", "Precision", "ReplicaMode", "SubZeroConfig", "UpdateRounding",
           "check_deepspeed_accepts", "deepspeed_section", "hpz_state_problems", "load_ds_config",
           "parse", "parse_config"]


def parse(ds_config: Mapping[str, Any], source: str = "the DeepSpeed config") -> tuple[SubZeroConfig, DeepSpeedSettings]:
    """Validate the ``"subzero"`` section and the DeepSpeed settings it depends on.

    Args:
        ds_config: the whole DeepSpeed config dict.
        source: where it came from, used in the error message (a path, or "the DeepSpeed config").

    Returns:
        The section's settings and the DeepSpeed settings (defaults fill keys that are absent).

    Raises:
        ConfigError: listing every problem found, each with the key, the bad value and the fix.
    """
    problems: list[str] = []
    section = ds_config.get(SECTION, {})
    settings = None
    if not isinstance(section, Mapping):
        problems.append(f"`{SECTION}` must be a JSON object of settings, got {shown(section)}.")
    else:
        settings, section_problems = parse_section(section)
        problems.extend(section_problems)
    deepspeed, deepspeed_problems = parse_deepspeed(ds_config)
    problems.extend(deepspeed_problems)
    if settings is not None and deepspeed is not None:
        problems.extend(hpz_state_problems(settings, deepspeed))
    raise_problems(problems, source)
    assert settings is not None and deepspeed is not None
    return settings, deepspeed


def hpz_state_problems(settings: SubZeroConfig, deepspeed: DeepSpeedSettings) -> list[str]:
    """hpZ's secondary copy is written like the shard, and an update rule keeps its state for both ranges; a
    direction's per-element state (HiZOO's Hessian) exists for the shard's range only: refused under hpZ."""
    from ..methods import registry

    size = deepspeed.hpz_partition_size  # > 1 only under ZeRO-3: parse_deepspeed refuses it elsewhere
    spec = registry.method(settings.method)
    if size <= 1 or not spec.state_bytes_per_element:
        return []
    return [f"`subzero.method` is {spec.name!r}, whose direction keeps per-element state ({spec.state_name}) that "
            f"subzero_ds does not yet keep for ZeRO++ hpZ's secondary copy (`zero_optimization.zero_hpz_partition_size` "
            f"is {size}). Use `\"method\"` subzero, mezo, rademacher or sparse_mezo under hpZ, or remove "
            "zero_hpz_partition_size (plain ZeRO-3 serves every method)."]


def parse_config(ds_config: Mapping[str, Any], source: str = "the DeepSpeed config") -> SubZeroConfig:
    """The ``"subzero"`` section of :func:`parse` (the DeepSpeed settings are checked too)."""
    return parse(ds_config, source)[0]


def check_deepspeed_accepts(ds_config: Mapping[str, Any], source: str = "the DeepSpeed config") -> None:
    """Run DeepSpeed's own config parser over everything but our section, and check that this machine's
    accelerator has the configured precision: before anything is loaded.

    Raises:
        ConfigError: naming the setting DeepSpeed rejects and its value.
    """
    problems = deepspeed_accepts(deepspeed_section(ds_config))
    if not problems:
        deepspeed, _ = parse_deepspeed(ds_config)
        problems = unsupported_precision(deepspeed) if deepspeed is not None else []
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"DeepSpeed rejects {source}:\n{listing}\nFix these settings "
                          "(the keys are described at https://www.deepspeed.ai/docs/config-json/).")
