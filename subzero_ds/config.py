"""The ``"subzero"`` section of a DeepSpeed JSON config, validated strictly.

DeepSpeed ignores top-level keys it does not know, so nobody but us would notice a typo in
``"subzero"``. Every problem in the section, and every DeepSpeed setting we cannot serve, is
collected and reported together in one :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import json
import os
from enum import Enum
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SECTION = "subzero"


class Method(str, Enum):
    """Which random direction the two-point estimator uses."""

    SUBZERO = "subzero"  # low-rank U Z V^T in a lazily refreshed random subspace
    MEZO = "mezo"  # i.i.d. N(0, 1) in every element


class Reshape(str, Enum):
    """Whether SubZero views a matrix as its near-square factor pair before building U, V."""

    AUTO = "auto"  # on when the model has frozen parameters (PEFT), off for full fine-tuning
    ALWAYS = "always"
    NEVER = "never"


class ConfigError(ValueError):
    """A user-fixable problem in the DeepSpeed/subzero configuration (all problems at once)."""


class SubZeroConfig(BaseModel):
    """Settings of the zeroth-order optimizer (the ``"subzero"`` section)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_enum_values=False)

    method: Method = Field(
        Method.SUBZERO, strict=False, description='"subzero" (low-rank subspace directions) or "mezo" (full Gaussian).'
    )
    lr: float = Field(1e-6, ge=0.0, description="Learning rate eta, a number >= 0 (1e-6..1e-7 full FT, ~1e-4 LoRA).")
    eps: float = Field(1e-3, gt=0.0, description="Perturbation scale epsilon, a number > 0 (1e-3 full FT, 1e-2 LoRA).")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay lambda on matrices, a number >= 0.")
    rank: int = Field(24, ge=1, description="Subspace rank r of SubZero, an integer >= 1 (8..64; 24 is common).")
    subspace_interval: int = Field(
        1000, ge=1, description="Steps F between subspace refreshes of SubZero, an integer >= 1 (1000 published)."
    )
    reshape: Reshape = Field(
        Reshape.AUTO, strict=False, description='"auto" (on for PEFT, off for full FT), "always" or "never".'
    )
    seed: int = Field(0, ge=0, lt=2**63, description="Run seed every direction derives from, an integer >= 0.")
    fused: bool = Field(
        False,
        description="true: both perturbed losses from one forward over the doubled batch (no in-place perturbation).",
    )
    max_consecutive_skips: int = Field(
        10, ge=1, description="Stop the run after this many consecutive steps with a non-finite loss, an integer >= 1."
    )


# ZeRO stages that need no optimizer: 0 (whole parameters everywhere) and 3 (parameter partitioning).
SUPPORTED_ZERO_STAGES = (0, 3)


def load_ds_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read a DeepSpeed config from a JSON file path or take a copy of a dict.

    Raises:
        ConfigError: the file is missing, unreadable or not a JSON object.
    """
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    path = os.fspath(config)
    try:
        with open(path) as f:
            loaded = json.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"DeepSpeed config file {path!r} does not exist. Pass the path of a JSON file "
            f"(e.g. ds_configs/zero3_subzero.json) or a dict."
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"DeepSpeed config file {path!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
            "Fix the JSON syntax there."
        ) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"DeepSpeed config file {path!r} must hold a JSON object, got {type(loaded).__name__}.")
    return loaded


def parse_config(ds_config: Mapping[str, Any], source: str = "the DeepSpeed config") -> SubZeroConfig:
    """Validate the ``"subzero"`` section and the DeepSpeed settings it depends on.

    Args:
        ds_config: the whole DeepSpeed config dict.
        source: where it came from, used in the error message (a path, or "the DeepSpeed config").

    Returns:
        The validated settings (defaults fill keys that are absent).

    Raises:
        ConfigError: listing every problem found, each with the key, the bad value and the fix.
    """
    problems: list[str] = []
    section = ds_config.get(SECTION, {})
    settings = None
    if not isinstance(section, Mapping):
        problems.append(f"`{SECTION}` must be a JSON object of settings, got {section!r}.")
    else:
        try:
            settings = SubZeroConfig.model_validate(dict(section))
        except ValidationError as e:
            problems.extend(_describe(err) for err in e.errors())
    problems.extend(_deepspeed_problems(ds_config))
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"found the following errors in {source}:\n{listing}")
    assert settings is not None
    return settings


def zero_stage(ds_config: Mapping[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when there is no zero_optimization block)."""
    zero = ds_config.get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, Mapping) else 0


def deepspeed_section(ds_config: Mapping[str, Any]) -> dict[str, Any]:
    """The config DeepSpeed itself receives: everything but our section."""
    return {k: v for k, v in ds_config.items() if k != SECTION}


def _describe(err: Mapping[str, Any]) -> str:
    location = ".".join(str(part) for part in err["loc"])
    key = f"{SECTION}.{location}"
    if err["type"] == "extra_forbidden":
        known = ", ".join(SubZeroConfig.model_fields)
        return f"`{key}` is not a known setting (got {err['input']!r}). Remove it; known settings: {known}."
    field = SubZeroConfig.model_fields.get(str(err["loc"][0]))
    fix = field.description if field is not None else ""
    return f"`{key}`: {err['msg'].lower()}, got {err['input']!r}. Expected: {fix}"


def _deepspeed_problems(ds_config: Mapping[str, Any]) -> list[str]:
    problems = []
    if ds_config.get("optimizer") is not None:
        problems.append(
            "`optimizer` is set, but zeroth-order training has no first-order optimizer: DeepSpeed would "
            "allocate gradients and optimizer state and compete with ours. Remove the `optimizer` block and "
            f"put `lr`/`weight_decay` in the `{SECTION}` section."
        )
    if ds_config.get("scheduler") is not None:
        problems.append(
            "`scheduler` is set, but DeepSpeed schedulers drive a DeepSpeed optimizer, which ZO training does "
            f"not have. Remove the `scheduler` block; the learning rate is `{SECTION}.lr`."
        )
    zero = ds_config.get("zero_optimization", {})
    if not isinstance(zero, Mapping):
        problems.append(f"`zero_optimization` must be a JSON object, got {zero!r}.")
        return problems
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_ZERO_STAGES:
        problems.append(
            f"`zero_optimization.stage` is {stage!r}, which partitions optimizer state or gradients that ZO "
            "training does not have. Use 3 (partitioned parameters, the scalable path) or 0."
        )
    elif stage == 0 and zero.get("offload_param"):
        problems.append("`zero_optimization.offload_param` needs stage 3. Set `zero_optimization.stage` to 3.")
    if zero.get("offload_optimizer"):
        problems.append(
            "`zero_optimization.offload_optimizer` is set, but there is no optimizer state to offload. "
            "Remove it (use `offload_param` to offload the parameters)."
        )
    accumulation = ds_config.get("gradient_accumulation_steps", 1)
    if accumulation not in (1, "auto"):
        problems.append(
            f"`gradient_accumulation_steps` is {accumulation!r}; a ZO step uses one micro-batch and "
            "accumulates nothing. Set it to 1 and raise the micro-batch size instead."
        )
    return problems
