"""The ``"subzero"`` section: the keys every method has, plus the chosen method's and update rule's own.

DeepSpeed ignores top-level keys it does not know, so nobody but us would notice a typo here. The
section is flat JSON (``{"method": "subzero", "rank": 24, "update": "adam", "betas": [...]}``); it
is parsed into :class:`SubZeroConfig`, whose ``options`` are the method's own settings (declared in
its file, ``methods/<name>.py``) and ``update_options`` the update rule's. A key that belongs to
another method or rule is refused by name. Every problem is collected and reported at once.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any, Callable, Mapping

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, model_validator

from ..distributed import DEFAULT_COLLECTIVE_TIMEOUT
from ..methods import registry
from ..methods.registry import Options
from .errors import SECTION, describe_validation_error, shown


class UpdateRounding(str, Enum):
    """How a half-precision parameter takes its update θ − η(g·D + λθ), computed in fp32."""

    NEAREST = "nearest"  # round to nearest even: an update below half an ulp of θ is lost
    STOCHASTIC = "stochastic"  # round up or down with probability from the dropped bits (bf16): unbiased


class ReplicaMode(str, Enum):
    """What the replica groups (hpZ groups, or single ranks under ZeRO-0) of a run share."""

    DATA = "data"  # each rank its own micro-batch, one set of directions: the global batch is over all ranks
    PERTURBATION = "perturbation"  # every group the same batch and its own directions: R·q directions per step


class CoreSettings(BaseModel):
    """The keys of the ``"subzero"`` section that every method has."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    method: str = Field("subzero", description=f"The ZO method, one of: {', '.join(registry.method_names())}.")
    lr: float = Field(
        1e-6, ge=0.0, allow_inf_nan=False,
        description="Learning rate eta, a finite number >= 0 (1e-6..1e-7 full FT, ~1e-4 LoRA).")
    eps: float = Field(
        1e-3, gt=0.0, allow_inf_nan=False, description="Perturbation scale epsilon, a finite number > 0 (1e-3 full FT, 1e-2 LoRA).")
    weight_decay: float = Field(
        0.0, ge=0.0, allow_inf_nan=False, description="Decoupled weight decay lambda on matrices, a finite number >= 0.")
    seed: int = Field(0, ge=0, lt=2**63, description="Run seed every direction derives from, an integer >= 0.")
    fused: bool = Field(
        False, description="true: both perturbed losses from one forward over the doubled batch (no in-place perturbation).")
    update_rounding: UpdateRounding = Field(
        UpdateRounding.NEAREST, strict=False,
        description='"nearest" or "stochastic": seeded, unbiased rounding of each bf16 parameter\'s update '
                    "(an update smaller than half an ulp of the weight survives in expectation).")
    update: str = Field("sgd", description=f"How g·D becomes the step, one of: {', '.join(registry.update_names())}.")
    queries: int = Field(1, ge=1, description="Directions per step q, an integer >= 1 (2q forwards; update: their mean).")
    replica_mode: ReplicaMode = Field(
        ReplicaMode.DATA, strict=False,
        description='"data" or "perturbation": with R replica groups (ZeRO++ hpZ groups; under ZeRO-0 every rank), '
                    '"data" gives each rank its own micro-batch; "perturbation" gives every group the same batch '
                    "and its own q directions, R·q per step, at the time of q (each rank takes its share of the "
                    "batch within its group).")
    max_consecutive_skips: int = Field(
        10, ge=1, description="Stop the run after this many consecutive steps with a non-finite loss, an integer >= 1.")
    collective_timeout: float = Field(
        DEFAULT_COLLECTIVE_TIMEOUT, gt=0.0, allow_inf_nan=False,
        description="Seconds a rank waits in a collective (ZeRO-3's gathers, the step's all-reduce, a checkpoint's "
                    "barriers) for the other ranks before the run stops with a message, a finite number > 0: the "
                    "process group's timeout (a hung or stopped rank otherwise stalls the job for 30 minutes).")


class SubZeroConfig(CoreSettings):
    """The validated ``"subzero"`` section.

    Build it with :meth:`from_section` (or ``model_validate`` of the flat section). ``options`` holds
    the method's own settings (e.g. SubZero's ``rank``), ``update_options`` the update rule's (e.g.
    Adam's ``betas``); keys left out take their defaults.
    """

    options: SerializeAsAny[Options] = Field(default=None, validate_default=False)  # type: ignore[assignment]
    update_options: SerializeAsAny[Options] = Field(default=None, validate_default=False)  # type: ignore[assignment]

    @model_validator(mode="wrap")
    @classmethod
    def _from_flat_section(cls, data: Any, handler: Callable) -> SubZeroConfig:
        """A flat section (the JSON's shape) is split and checked by :func:`parse_section` first."""
        if isinstance(data, Mapping) and "options" not in data:
            config, problems = parse_section(data)
            if problems:
                raise ValueError("\n".join(problems))
            data = dict(config)  # validated: the core keys, options and update_options, for pydantic to build
        return handler(data)

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> SubZeroConfig:
        """Parse the flat ``"subzero"`` section.

        Raises:
            ValueError: listing every problem, one per line.
        """
        return cls.model_validate(dict(section))

    def flat(self) -> dict[str, Any]:
        """The section as JSON values, flat as it is written (every key, defaults included)."""
        core = {k: v for k, v in self.model_dump(mode="json").items() if k not in ("options", "update_options")}
        return {**core, **self.options.model_dump(mode="json"), **self.update_options.model_dump(mode="json")}

    def direction_settings(self) -> dict[str, Any]:
        """The settings that, with the step, define every direction and the meaning of the method's state:
        a resumed run must have the same."""
        flat = self.flat()
        keys = ("method", "seed", "queries", "update", *registry.method(self.method).direction_settings)
        return {key: flat[key] for key in keys}


def parse_section(section: Mapping[str, Any]) -> tuple[SubZeroConfig | None, list[str]]:
    """Validate the flat ``"subzero"`` section: core keys, the method's and the update rule's keys, and the
    rules across them.

    Returns:
        The config (None if there were problems) and every problem found, each naming the key, the
        value and the fix.
    """
    problems: list[str] = []
    core_fields = set(CoreSettings.model_fields)
    core = _validated(CoreSettings, {k: v for k, v in section.items() if k in core_fields}, problems)
    method_name = section.get("method", CoreSettings.model_fields["method"].default)
    update_name = section.get("update", CoreSettings.model_fields["update"].default)
    method = _registered("method", method_name, registry.method_names(), registry.method, problems)
    update = _registered("update", update_name, registry.update_names(), registry.update, problems)
    own = {k: v for k, v in section.items() if k not in core_fields}
    method_keys = {k: own.pop(k) for k in list(own) if method is not None and k in method.options.model_fields}
    update_keys = {k: own.pop(k) for k in list(own) if update is not None and k in update.options.model_fields}
    problems.extend(_foreign_key(key, value, method_name, update_name) for key, value in own.items())
    options = _validated(method.options, method_keys, problems) if method is not None else None
    update_options = _validated(update.options, update_keys, problems) if update is not None else None
    if problems or core is None or options is None or update_options is None:
        return None, problems
    config = SubZeroConfig.model_construct(**dict(core), options=options, update_options=update_options)
    for rule in (*RULES, *method.rules):
        problem = rule(config)
        if problem:
            problems.append(problem)
    return (None if problems else config), problems


def drop_other_methods_keys(section: Mapping[str, Any]) -> dict[str, Any]:
    """``section`` without the keys that belong only to methods or update rules other than its own.

    For a section shared by several methods (a sweep's common settings: SubZero's ``rank`` beside a
    MeZO cell) made valid for one. Keys nobody registered stay, so that a typo is still reported.
    """
    method, update = section.get("method", "subzero"), section.get("update", "sgd")
    mine: set[str] = set(CoreSettings.model_fields)
    if method in registry.method_names():
        mine |= set(registry.method(method).options.model_fields)
    if update in registry.update_names():
        mine |= set(registry.update(update).options.model_fields)
    others = set(_keys_of_every_method()) - mine
    return {k: v for k, v in section.items() if k not in others}


def _validated(model: type[BaseModel], values: dict[str, Any], problems: list[str]) -> Any:
    """``model`` of ``values``, or None with one problem per bad key added to ``problems``."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        descriptions = {name: field.description or "" for name, field in model.model_fields.items()}
        problems.extend(describe_validation_error(error, SECTION, descriptions))
        return None


def _registered(key: str, name: Any, known: list[str], lookup: Callable, problems: list[str]) -> Any:
    if not isinstance(name, str) or name not in known:
        if isinstance(name, str):  # other types: CoreSettings reports them
            problems.append(f"`{SECTION}.{key}`: not a registered {key}, got {shown(name)}. "
                            f"Expected: one of {', '.join(known)}.")
        return None
    return lookup(name)


def _foreign_key(key: str, value: Any, method: Any, update: Any) -> str:
    """The problem of a key that neither the core, the method nor the update rule has."""
    owners = [f'`{SECTION}.method` "{m}"' for m in registry.method_names() if key in registry.method(m).options.model_fields]
    owners += [f'`{SECTION}.update` "{u}"' for u in registry.update_names() if key in registry.update(u).options.model_fields]
    if owners:
        return (f"`{SECTION}.{key}` (got {shown(value)}) belongs to {' and '.join(owners)}, but this config has "
                f"method {_quoted(method)} and update {_quoted(update)}: remove it, or choose that method or update rule.")
    known = [*CoreSettings.model_fields, *_keys_of_every_method()]
    return f"`{SECTION}.{key}` is not a known setting (got {shown(value)}). Remove it; known settings: {', '.join(known)}."


def _quoted(value: Any) -> str:
    """A JSON string as JSON writes it ("mezo"), anything else as its repr."""
    return json.dumps(value) if isinstance(value, str) else shown(value)


def _keys_of_every_method() -> list[str]:
    keys: dict[str, None] = {}
    for name in registry.method_names():
        keys.update(dict.fromkeys(registry.method(name).options.model_fields))
    for name in registry.update_names():
        keys.update(dict.fromkeys(registry.update(name).options.model_fields))
    return list(keys)


# ---- Rules across keys: one small function each, returning the problem or None ----

def update_rule_allowed(config: SubZeroConfig) -> str | None:
    spec = registry.method(config.method)
    if config.update not in spec.updates:
        return (f'`{SECTION}.update` is "{config.update}", but `{SECTION}.method` "{config.method}" updates with '
                f"{' or '.join(repr(u) for u in spec.updates)} only: set `{SECTION}.update` to \"{spec.updates[0]}\", "
                "or use another method.")
    return None


def queries_allowed(config: SubZeroConfig) -> str | None:
    if config.queries != 1 and not registry.method(config.method).multi_query:
        return (f'`{SECTION}.queries` is {config.queries}, but `{SECTION}.method` "{config.method}" takes one direction '
                f"per step: set `{SECTION}.queries` to 1, or use another method.")
    return None


def fused_allowed(config: SubZeroConfig) -> str | None:
    if config.fused and not registry.method(config.method).fusable:
        return (f'`{SECTION}.fused` is true, but `{SECTION}.method` "{config.method}" has no fused ± pass (its '
                f"direction reads state or θ that the side paths do not see): set `{SECTION}.fused` to false, or use "
                "another method.")
    return None


def replica_mode_allowed(config: SubZeroConfig) -> str | None:
    if config.replica_mode is ReplicaMode.PERTURBATION and not registry.method(config.method).multi_query:
        return (f'`{SECTION}.replica_mode` is "perturbation", but `{SECTION}.method` "{config.method}" takes one '
                f"direction per step, and perturbation mode gives each replica group its own: set `{SECTION}.replica_mode` "
                'to "data", or use another method.')
    return None


RULES: tuple[Callable[[SubZeroConfig], str | None], ...] = (update_rule_allowed, queries_allowed, fused_allowed,
                                                              replica_mode_allowed)
