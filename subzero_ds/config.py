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
from typing import Annotated, Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SECTION = "subzero"


class Method(str, Enum):
    """Which random direction (and estimator) a ZO step uses."""

    SUBZERO = "subzero"  # low-rank U Z V^T in a lazily refreshed random subspace
    MEZO = "mezo"  # i.i.d. N(0, 1) in every element
    HIZOO = "hizoo"  # Gaussian preconditioned by a diagonal Hessian estimate; probes ℓ0, ℓ+, ℓ−
    SPARSE_MEZO = "sparse_mezo"  # Gaussian on the small-magnitude weights of each parameter only


class Update(str, Enum):
    """How g·D becomes Δθ."""

    SGD = "sgd"  # θ ← θ − η(g·D + λθ)
    MOMENTUM = "momentum"  # M ← βM + g·D; θ ← θ − η(M + λθ)
    ADAM = "adam"  # Adam's moments of g·D


class StateOnRefresh(str, Enum):
    """What SubZero's subspace-coordinate momentum/Adam state does when U, V are redrawn."""

    RESET = "reset"  # start from zero in the new subspace
    PROJECT = "project"  # carry over: M ← (U_newᵀ U_old) M (V_oldᵀ V_new)


class Reshape(str, Enum):
    """Whether SubZero views a matrix as its near-square factor pair before building U, V."""

    AUTO = "auto"  # on when the model has frozen parameters (PEFT), off for full fine-tuning
    ALWAYS = "always"
    NEVER = "never"


class UpdateRounding(str, Enum):
    """How a half-precision parameter takes its update θ − η(g·D + λθ), computed in fp32."""

    NEAREST = "nearest"  # round to nearest even: an update below half an ulp of θ is lost
    STOCHASTIC = "stochastic"  # round up or down with probability from the dropped bits (bf16): unbiased


class ConfigError(ValueError):
    """A user-fixable problem in the DeepSpeed/subzero configuration (all problems at once)."""


class SubZeroConfig(BaseModel):
    """Settings of the zeroth-order optimizer (the ``"subzero"`` section)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_enum_values=False)

    method: Method = Field(
        Method.SUBZERO, strict=False, description='"subzero" (low-rank subspace directions) or "mezo" (full Gaussian).'
    )
    lr: float = Field(
        1e-6, ge=0.0, allow_inf_nan=False,
        description="Learning rate eta, a finite number >= 0 (1e-6..1e-7 full FT, ~1e-4 LoRA).",
    )
    eps: float = Field(
        1e-3, gt=0.0, allow_inf_nan=False,
        description="Perturbation scale epsilon, a finite number > 0 (1e-3 full FT, 1e-2 LoRA).",
    )
    weight_decay: float = Field(
        0.0, ge=0.0, allow_inf_nan=False, description="Decoupled weight decay lambda on matrices, a finite number >= 0."
    )
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
    update_rounding: UpdateRounding = Field(
        UpdateRounding.NEAREST, strict=False,
        description='"nearest" or "stochastic": seeded, unbiased rounding of each bf16 parameter\'s update '
                    "(an update smaller than half an ulp of the weight survives in expectation).",
    )
    update: Update = Field(
        Update.SGD, strict=False, description='"sgd", "momentum" or "adam": how g·D becomes the step.'
    )
    queries: int = Field(1, ge=1, description="Directions per step q, an integer >= 1 (2q forwards; update: their mean).")
    momentum: float = Field(
        0.9, ge=0.0, lt=1.0, allow_inf_nan=False, description='β of "update": "momentum", a number in [0, 1).'
    )
    betas: list[Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)]] = Field(
        [0.9, 0.999], min_length=2, max_length=2, description='β1, β2 of "update": "adam", two numbers in [0, 1).'
    )
    adam_eps: float = Field(1e-8, gt=0.0, allow_inf_nan=False, description="Adam's ε, a number > 0.")
    state_on_refresh: StateOnRefresh = Field(
        StateOnRefresh.RESET, strict=False,
        description='SubZero momentum/Adam state at a subspace refresh: "reset" or "project" into the new subspace.',
    )
    hessian_smooth: float = Field(
        1e-8, ge=0.0, le=1.0, allow_inf_nan=False,
        description="HiZOO's Hessian smoothing α in [0, 1] (the authors' OPT-13B setting: 1e-8).",
    )
    sparsity: float = Field(
        0.75, gt=0.0, lt=1.0, allow_inf_nan=False,
        description="S-MeZO: the share of each parameter's largest-magnitude elements left out, in (0, 1).",
    )
    mask_interval: int = Field(
        100, ge=1, description="S-MeZO: steps between recomputations of the per-parameter magnitude thresholds.",
    )
    max_consecutive_skips: int = Field(
        10, ge=1, description="Stop the run after this many consecutive steps with a non-finite loss, an integer >= 1."
    )


    @model_validator(mode="after")
    def _combinations(self) -> "SubZeroConfig":
        """Settings that cannot go together, each problem naming both keys."""
        problems = []
        own_update = {Method.HIZOO: "its own Hessian-scaled ZO-SGD", Method.SPARSE_MEZO: "a mask from the current θ"}
        if self.method in own_update:
            name = self.method.value
            if self.update is not Update.SGD:
                problems.append(f'`subzero.update` is "{self.update.value}", but `subzero.method` "{name}" updates '
                                f'with {own_update[self.method]}: set `subzero.update` to "sgd" or use method '
                                '"subzero"/"mezo".')
            if self.queries != 1:
                problems.append(f"`subzero.queries` is {self.queries}, but `subzero.method` \"{name}\" takes one "
                                'direction per step: set `subzero.queries` to 1 or use method "subzero"/"mezo".')
            if self.fused:
                problems.append(f"`subzero.fused` is true, but `subzero.method` \"{name}\" has no fused ± pass (its "
                                'direction is neither low-rank nor a function of position alone): set `subzero.fused` '
                                'to false, or use method "subzero"/"mezo".')
        if "state_on_refresh" in self.model_fields_set and (self.method is not Method.SUBZERO
                                                            or self.update is Update.SGD):
            problems.append("`subzero.state_on_refresh` is set, but it applies to `subzero.method` \"subzero\" with "
                            '`subzero.update` "momentum" or "adam" only (got method '
                            f'"{self.method.value}", update "{self.update.value}"): remove it.')
        if problems:
            raise ValueError(_PROBLEM_SEPARATOR.join(problems))
        return self


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
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f, object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise ConfigError(
            f"DeepSpeed config file {path!r} does not exist. Pass the path of a JSON file "
            f"(e.g. ds_configs/zero3_subzero.json) or a dict."
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"DeepSpeed config {path!r} is a directory. Pass the path of a JSON file in it.") from None
    except OSError as e:
        raise ConfigError(
            f"DeepSpeed config file {path!r} cannot be read ({e.strerror}). Check its permissions."
        ) from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"DeepSpeed config file {path!r} is not UTF-8 text (byte {e.start}): pass a JSON file, saved as UTF-8."
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"DeepSpeed config file {path!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
            "Fix the JSON syntax there."
        ) from None
    except _DuplicateKey as e:
        raise ConfigError(
            f"DeepSpeed config file {path!r} sets {e.args[0]!r} twice in the same object; JSON would silently keep "
            "the last one. Remove one of them."
        ) from None
    except RecursionError:
        raise ConfigError(f"DeepSpeed config file {path!r} is nested too deeply to be a DeepSpeed config.") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"DeepSpeed config file {path!r} must hold a JSON object, got {type(loaded).__name__}.")
    return loaded


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


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
            first_per_key = {err["loc"][:1]: err for err in reversed(e.errors())}  # betas.0 and betas.1: one line
            problems.extend(_describe(err) for err in reversed(first_per_key.values()))
    problems.extend(_deepspeed_problems(ds_config))
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"found the following errors in {source}:\n{listing}")
    assert settings is not None
    return settings


def check_deepspeed_accepts(ds_config: Mapping[str, Any], source: str = "the DeepSpeed config") -> None:
    """Run DeepSpeed's own config parser over everything but our section, before anything is loaded.

    DeepSpeed would otherwise reject a bad value (a misspelt ``zero_optimization`` key, an unknown
    offload device) only inside ``deepspeed.initialize``, with an assertion or a traceback, after the
    model was loaded. The batch-size arithmetic depends on the world size, unknown before the process
    group exists, so ``train_batch_size`` and ``gradient_accumulation_steps`` are left to
    :func:`parse_config` here.

    Raises:
        ConfigError: naming the setting DeepSpeed rejects and its value.
    """
    import deepspeed.utils
    from deepspeed.runtime.config import DeepSpeedConfig

    section = copy.deepcopy(deepspeed_section(ds_config))
    section.pop("train_batch_size", None)
    section.pop("gradient_accumulation_steps", None)
    section.setdefault("train_micro_batch_size_per_gpu", 1)
    level = deepspeed.utils.logger.level
    deepspeed.utils.logger.setLevel("WARNING")  # it logs its world size at INFO
    try:
        DeepSpeedConfig(section)
    except ValidationError as e:
        prefix = _DEEPSPEED_SECTIONS.get(e.title, e.title)
        problems = [f"`{'.'.join([*filter(None, [prefix]), *map(str, err['loc'])])}`: {err['msg'].lower()}, "
                    f"got {_shown(err['input'])}." for err in e.errors()]
    except (AssertionError, ValueError, TypeError, KeyError, AttributeError) as e:
        problems = [f"{type(e).__name__}: {_shown(str(e), 300)}"]
    else:
        problems = _unsupported_precisions(section)
    finally:
        deepspeed.utils.logger.setLevel(level)
    if not problems:
        return
    listing = "\n".join(f"  - {p}" for p in problems)
    raise ConfigError(
        f"DeepSpeed rejects {source}:\n{listing}\nFix these settings "
        "(the keys are described at https://www.deepspeed.ai/docs/config-json/)."
    )


def _unsupported_precisions(section: Mapping[str, Any]) -> list[str]:
    """The half precisions the config enables that this machine's accelerator lacks.

    DeepSpeed checks this only inside ``deepspeed.initialize`` ("Type fp16 is not supported on your
    device"); a CPU without AVX-512 FP16 (most of them) has bf16 but not fp16.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"fp16": accelerator.is_fp16_supported(), "bf16": accelerator.is_bf16_supported()}
    other = {"fp16": "bf16", "bf16": "fp16"}
    return [f"`{key}.enabled`: this machine's {accelerator.device_name()} accelerator does not support {key}, got true. "
            f"Train in fp32 (remove the \"{key}\" block) or set \"{other[key]}\": {{\"enabled\": true}} if it supports that."
            for key in ("fp16", "bf16")
            if not supported[key] and isinstance(section.get(key), Mapping) and section[key].get("enabled") is True]


# Titles of DeepSpeed's pydantic config models -> the config key each one reads.
_DEEPSPEED_SECTIONS = {
    "DeepSpeedZeroConfig": "zero_optimization",
    "DeepSpeedZeroOffloadParamConfig": "zero_optimization.offload_param",
    "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization.offload_optimizer",
    "DeepSpeedBF16Config": "bf16",
    "DeepSpeedFP16Config": "fp16",
    "DeepSpeedMonitorConfig": "",  # its errors name the monitor ("tensorboard.…") themselves
    "DeepSpeedActivationCheckpointingConfig": "activation_checkpointing",
    "DeepSpeedFlopsProfilerConfig": "flops_profiler",
    "CommsConfig": "comms_logger",
    "DeepSpeedAIOConfig": "aio",
}


def zero_stage(ds_config: Mapping[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when there is no zero_optimization block)."""
    zero = ds_config.get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, Mapping) else 0


def deepspeed_section(ds_config: Mapping[str, Any]) -> dict[str, Any]:
    """The config DeepSpeed itself receives: everything but our section."""
    return {k: v for k, v in ds_config.items() if k != SECTION}


_PROBLEM_SEPARATOR = "\n"  # between the problems one validator finds (each becomes a line of the report)


def _describe(err: Mapping[str, Any]) -> str:
    if not err["loc"]:  # a check of several settings together (SubZeroConfig._combinations)
        return err["msg"].removeprefix("Value error, ").replace(_PROBLEM_SEPARATOR, "\n  - ")
    key = f"{SECTION}.{err['loc'][0]}"
    if err["type"] == "extra_forbidden":
        known = ", ".join(SubZeroConfig.model_fields)
        return f"`{key}` is not a known setting (got {_shown(err['input'])}). Remove it; known settings: {known}."
    field = SubZeroConfig.model_fields.get(str(err["loc"][0]))
    fix = field.description if field is not None else ""
    return f"`{key}`: {err['msg'].lower()}, got {_shown(err['input'])}. Expected: {fix}"


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut short so that one huge value cannot bury the rest of the message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size"):
        value = ds_config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"`{key}` must be an integer >= 1, got {_shown(value)}. Set a positive batch size.")
    for key in ("bf16", "fp16"):
        value = ds_config.get(key)
        if value is not None and not isinstance(value, Mapping):
            problems.append(f'`{key}` must be a JSON object such as {{"enabled": true}}, got {_shown(value)}.')
    zero = ds_config.get("zero_optimization", {})
    if not isinstance(zero, Mapping):
        problems.append(f"`zero_optimization` must be a JSON object, got {_shown(zero)}.")
        return problems
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in SUPPORTED_ZERO_STAGES:
        problems.append(
            f"`zero_optimization.stage` is {_shown(stage)}, which partitions optimizer state or gradients that ZO "
            "training does not have. Use 3 (partitioned parameters, the scalable path) or 0."
        )
    elif stage == 0 and zero.get("offload_param"):
        problems.append("`zero_optimization.offload_param` needs stage 3. Set `zero_optimization.stage` to 3.")
    offload = zero.get("offload_param")
    if isinstance(offload, Mapping) and offload.get("device") == "nvme" and not offload.get("nvme_path"):
        problems.append(
            "`zero_optimization.offload_param.device` is \"nvme\" but `zero_optimization.offload_param.nvme_path` "
            "is not set. Set it to a directory on the NVMe drive."
        )
    if zero.get("offload_optimizer"):
        problems.append(
            "`zero_optimization.offload_optimizer` is set, but there is no optimizer state to offload. "
            "Remove it (use `offload_param` to offload the parameters)."
        )
    accumulation = ds_config.get("gradient_accumulation_steps", 1)
    if accumulation != "auto" and (not isinstance(accumulation, int) or isinstance(accumulation, bool)
                                   or accumulation < 1):
        problems.append(
            f"`gradient_accumulation_steps` is {_shown(accumulation)}: it must be an integer >= 1, the "
            "micro-batches each rank averages every probe's loss over before one ZO update."
        )
    return problems


def accumulation_steps(ds_config: Mapping[str, Any]) -> int:
    """Micro-batches per ZO step on each rank (DeepSpeed's ``gradient_accumulation_steps``; "auto": 1)."""
    value = ds_config.get("gradient_accumulation_steps", 1)
    return 1 if value == "auto" else int(value)


def check_offload_paths(ds_config: Mapping[str, Any], source: str = "the DeepSpeed config") -> None:
    """Check that NVMe offload can start, before any work does (call before ``deepspeed.initialize``).

    For ``zero_optimization.offload_param.device == "nvme"``: ``nvme_path`` must be an existing,
    writable directory (DeepSpeed would create a mistyped path silently, on whatever disk it lands
    on, or fail deep inside ``zero.Init``), and DeepSpeed's ``async_io`` op must be buildable
    (it needs libaio). Other devices need nothing.

    Raises:
        ConfigError: every problem found, each naming the key, the value and the fix.
    """
    zero = ds_config.get("zero_optimization")
    offload = zero.get("offload_param") if isinstance(zero, Mapping) else None
    if not isinstance(offload, Mapping) or offload.get("device") != "nvme" or not offload.get("nvme_path"):
        return  # not NVMe, or a missing nvme_path that parse_config reports
    key = "zero_optimization.offload_param.nvme_path"
    path = os.fspath(offload["nvme_path"])
    problems = []
    if not os.path.exists(path):
        problems.append(
            f"`{key}` is {_shown(path)}, which does not exist. Create it (`mkdir -p {path}`) on the NVMe drive, "
            "or point it at an existing directory there: DeepSpeed writes one swap file per parameter partition in it."
        )
    elif not os.path.isdir(path):
        problems.append(f"`{key}` is {_shown(path)}, which is a file, not a directory. Point it at a directory "
                        "on the NVMe drive.")
    elif not os.access(path, os.W_OK | os.X_OK):
        problems.append(f"`{key}` is {_shown(path)}, which this user cannot write to. Make it writable "
                        f"(`chmod u+w {path}`) or choose a directory you own on the NVMe drive.")
    if not _async_io_available():
        problems.append(
            "`zero_optimization.offload_param.device` is \"nvme\", but DeepSpeed's async_io op cannot be built: "
            "libaio is missing. Install it (`apt-get install libaio-dev`, or run scripts/setup.sh) and check "
            "`ds_report` lists async_io as compatible, or offload to \"cpu\" instead."
        )
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"found the following errors in {source}:\n{listing}")


def check_nvme_buffers(ds_config: Mapping[str, Any], param_numels: Mapping[str, int], world_size: int,
                       source: str = "the DeepSpeed config") -> None:
    """Check that every parameter partition DeepSpeed will swap to NVMe fits one swap buffer.

    DeepSpeed swaps a partition of ``ceil(numel / world_size)`` elements to NVMe when it holds at
    least ``max(1 MiB, aio.block_size)`` bytes, and asserts inside ``zero.Init`` ("More elements …
    than buffer size") when it exceeds ``offload_param.buffer_size`` (elements, default 1e8).

    Args:
        ds_config: the DeepSpeed config.
        param_numels: full (unpartitioned) element count of every parameter, by name.
        world_size: ranks the parameters are partitioned over.

    Raises:
        ConfigError: naming the largest such parameter, its partition size and the value to set.
    """
    zero = ds_config.get("zero_optimization")
    offload = zero.get("offload_param") if isinstance(zero, Mapping) else None
    if not isinstance(offload, Mapping) or offload.get("device") != "nvme" or not param_numels:
        return
    buffer_size = int(offload.get("buffer_size", 100_000_000))
    precision = next((k for k in ("bf16", "bfloat16", "fp16") if (ds_config.get(k) or {}).get("enabled")), None)
    element_size = 2 if precision else 4
    aio = ds_config.get("aio") or {}
    swappable_bytes = max(1024**2, int(aio.get("block_size", 1024**2)))
    name, numel = max(param_numels.items(), key=lambda item: item[1])
    partition = -(-numel // world_size)
    if partition * element_size >= swappable_bytes and partition > buffer_size:
        raise ConfigError(
            f"found the following errors in {source}:\n  - `zero_optimization.offload_param.buffer_size` is "
            f"{buffer_size:,} elements, but parameter {name!r} ({numel:,} elements) has partitions of {partition:,} "
            f"elements over {world_size} ranks, and each partition is swapped through one buffer. Set "
            f"`zero_optimization.offload_param.buffer_size` to at least {partition}."
        )


def _async_io_available() -> bool:
    """Whether DeepSpeed's async_io op (NVMe swapping) can be built here (compiles a libaio probe)."""
    import contextlib
    import io

    from deepspeed.ops.op_builder import AsyncIOBuilder

    with contextlib.redirect_stdout(io.StringIO()):  # it echoes the gcc commands of its probe
        return bool(AsyncIOBuilder().is_compatible(verbose=False))
