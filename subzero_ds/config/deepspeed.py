"""One typed view of the DeepSpeed settings a ZO run depends on, parsed once and read everywhere.

:func:`parse_deepspeed` reads the config's precision (``bf16``, its alias ``bfloat16``, ``fp16``),
ZeRO stage, parameter offload, ZeRO-3 gather settings, accumulation and batch sizes into
:class:`DeepSpeedSettings`, with DeepSpeed's defaults, and refuses what a ZO run cannot serve (an
optimizer, a scheduler, ZeRO stage 1/2, optimizer offload). :func:`deepspeed_accepts` runs
DeepSpeed's own parser over the rest, so that a value DeepSpeed would reject deep inside
``deepspeed.initialize`` is reported before any model loads. What the machine can do (accelerator
precisions, libaio, the NVMe directory) is checked in ``environment.py``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import SECTION, describe_validation_error, shown

# ZeRO stages that need no optimizer: 0 (whole parameters everywhere) and 3 (parameter partitioning).
SUPPORTED_ZERO_STAGES = (0, 3)


class Precision(str, Enum):
    """The dtype of parameters and activations."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def bytes(self) -> int:
        """Bytes of one element."""
        return 4 if self is Precision.FP32 else 2

    @property
    def dtype(self) -> Any:
        """The torch dtype."""
        import torch

        return {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}[self]


class _Block(BaseModel):
    """A DeepSpeed block: the keys we read are typed, the others are DeepSpeed's business."""

    model_config = ConfigDict(extra="allow", frozen=True)


class _Enabled(_Block):
    enabled: bool = False


class _OffloadParam(_Block):
    device: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = None
    buffer_count: int = Field(5, ge=1)
    buffer_size: int = Field(100_000_000, ge=1)


class _Zero(_Block):
    stage: int = 0
    offload_param: _OffloadParam | None = None
    offload_optimizer: Any = None
    stage3_param_persistence_threshold: int = Field(100_000, ge=0)
    stage3_prefetch_bucket_size: int = Field(50_000_000, ge=0)
    stage3_max_live_parameters: int = Field(1_000_000_000, ge=0)
    stage3_max_reuse_distance: int = Field(1_000_000_000, ge=0)


class _Aio(_Block):
    block_size: int = Field(1024**2, ge=1)


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What a ZO run reads from a DeepSpeed config (everything but the ``"subzero"`` section).

    Attributes:
        section: the dict DeepSpeed receives (the config without our section).
        precision: fp32, bf16 or fp16.
        stage: the ZeRO stage (0 or 3).
        offload_device: "none", "cpu" or "nvme" (``zero_optimization.offload_param.device``).
        nvme_path: the NVMe swap directory.
        nvme_buffer_count, nvme_buffer_size: the swap buffers (count, elements each).
        persistence_threshold: parameters of at most this many elements stay gathered (ZeRO-3).
        prefetch_bucket_size, max_live_parameters, max_reuse_distance: ZeRO-3's gather settings.
        aio_block_size: DeepSpeed's async I/O block size in bytes.
        accumulation_steps: micro-batches per step on each rank (``gradient_accumulation_steps``; "auto": 1).
        micro_batch_size: ``train_micro_batch_size_per_gpu``, if set.
        train_batch_size: ``train_batch_size``, if set.
    """

    section: dict[str, Any]
    precision: Precision = Precision.FP32
    stage: int = 0
    offload_device: str = "none"
    nvme_path: str | None = None
    nvme_buffer_count: int = 5
    nvme_buffer_size: int = 100_000_000
    persistence_threshold: int = 100_000
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    aio_block_size: int = 1024**2
    accumulation_steps: int = 1
    micro_batch_size: int | None = None
    train_batch_size: int | None = None

    @property
    def offloads_to_nvme(self) -> bool:
        """Whether parameter partitions live in NVMe swap files."""
        return self.stage == 3 and self.offload_device == "nvme"


def deepspeed_section(ds_config: Mapping[str, Any]) -> dict[str, Any]:
    """The config DeepSpeed itself receives: everything but our section."""
    return {k: v for k, v in ds_config.items() if k != SECTION}


def parse_deepspeed(ds_config: Mapping[str, Any], zeroth_order: bool = True
                    ) -> tuple[DeepSpeedSettings | None, list[str]]:
    """Read the DeepSpeed settings of a config into the typed view.

    Args:
        ds_config: the whole config.
        zeroth_order: refuse what a ZO run cannot serve (False: a first-order baseline's config).

    Returns:
        The settings (None if there were problems) and every problem found (key, value, fix).
    """
    section = deepspeed_section(ds_config)
    problems = [p for rule in RULES for p in [rule(section)] if p] if zeroth_order else []
    blocks = {}
    for key, model in (("bf16", _Enabled), ("bfloat16", _Enabled), ("fp16", _Enabled), ("zero_optimization", _Zero),
                       ("aio", _Aio)):
        value = section.get(key)
        if value is None:
            blocks[key] = model()
        elif not isinstance(value, Mapping):
            problems.append(f"`{key}` must be a JSON object, got {shown(value)}.")
        else:
            try:
                blocks[key] = model.model_validate(dict(value))
            except ValidationError as error:
                problems.extend(describe_validation_error(_flatten_locations(error), key))
    if problems:
        return None, problems
    zero, offload = blocks["zero_optimization"], blocks["zero_optimization"].offload_param or _OffloadParam()
    precision = (Precision.BF16 if blocks["bf16"].enabled or blocks["bfloat16"].enabled
                 else Precision.FP16 if blocks["fp16"].enabled else Precision.FP32)
    accumulation = section.get("gradient_accumulation_steps", 1)
    return DeepSpeedSettings(
        section=section, precision=precision, stage=zero.stage, offload_device=offload.device,
        nvme_path=offload.nvme_path, nvme_buffer_count=offload.buffer_count, nvme_buffer_size=offload.buffer_size,
        persistence_threshold=zero.stage3_param_persistence_threshold,
        prefetch_bucket_size=zero.stage3_prefetch_bucket_size, max_live_parameters=zero.stage3_max_live_parameters,
        max_reuse_distance=zero.stage3_max_reuse_distance, aio_block_size=blocks["aio"].block_size,
        accumulation_steps=1 if accumulation == "auto" else int(accumulation),
        micro_batch_size=section.get("train_micro_batch_size_per_gpu"), train_batch_size=section.get("train_batch_size"),
    ), []


class _Located(Exception):
    """A ValidationError whose errors carry their whole dotted key as one location (for nested blocks)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self._errors = errors

    def errors(self) -> list[dict[str, Any]]:
        return self._errors


def _flatten_locations(error: ValidationError) -> _Located:
    return _Located([{**err, "loc": (".".join(map(str, err["loc"])),)} for err in error.errors()])


# ---- What a ZO run cannot serve: one small rule each, returning the problem or None ----

def no_optimizer(section: Mapping[str, Any]) -> str | None:
    if section.get("optimizer") is not None:
        return ("`optimizer` is set, but zeroth-order training has no first-order optimizer: DeepSpeed would "
                "allocate gradients and optimizer state and compete with ours. Remove the `optimizer` block and "
                f"put `lr`/`weight_decay` in the `{SECTION}` section.")
    return None


def no_scheduler(section: Mapping[str, Any]) -> str | None:
    if section.get("scheduler") is not None:
        return ("`scheduler` is set, but DeepSpeed schedulers drive a DeepSpeed optimizer, which ZO training does "
                f"not have. Remove the `scheduler` block; the learning rate is `{SECTION}.lr`.")
    return None


def batch_sizes(section: Mapping[str, Any]) -> str | None:
    bad = [f"`{key}` must be an integer >= 1, got {shown(section[key])}" for key in
           ("train_micro_batch_size_per_gpu", "train_batch_size") if section.get(key) is not None
           and (isinstance(section[key], bool) or not isinstance(section[key], int) or section[key] < 1)]
    return "; ".join(bad) + ". Set a positive batch size." if bad else None


def accumulation_steps(section: Mapping[str, Any]) -> str | None:
    value = section.get("gradient_accumulation_steps", 1)
    if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        return (f"`gradient_accumulation_steps` is {shown(value)}: it must be an integer >= 1, the "
                "micro-batches each rank averages every probe's loss over before one ZO update.")
    return None


def zero_stage(section: Mapping[str, Any]) -> str | None:
    zero = section.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    if isinstance(stage, bool) or stage not in SUPPORTED_ZERO_STAGES:
        return (f"`zero_optimization.stage` is {shown(stage)}, which partitions optimizer state or gradients that ZO "
                "training does not have. Use 3 (partitioned parameters, the scalable path) or 0.")
    return None


def parameter_offload(section: Mapping[str, Any]) -> str | None:
    zero = section.get("zero_optimization")
    if not isinstance(zero, Mapping):
        return None
    offload = zero.get("offload_param")
    if zero.get("stage", 0) == 0 and offload:
        return "`zero_optimization.offload_param` needs stage 3. Set `zero_optimization.stage` to 3."
    if isinstance(offload, Mapping) and offload.get("device") == "nvme" and not offload.get("nvme_path"):
        return ("`zero_optimization.offload_param.device` is \"nvme\" but `zero_optimization.offload_param.nvme_path` "
                "is not set. Set it to a directory on the NVMe drive.")
    return None


def no_optimizer_offload(section: Mapping[str, Any]) -> str | None:
    zero = section.get("zero_optimization")
    if isinstance(zero, Mapping) and zero.get("offload_optimizer"):
        return ("`zero_optimization.offload_optimizer` is set, but there is no optimizer state to offload. "
                "Remove it (use `offload_param` to offload the parameters).")
    return None


RULES = (no_optimizer, no_scheduler, batch_sizes, zero_stage, parameter_offload, no_optimizer_offload,
         accumulation_steps)


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


def deepspeed_accepts(section: Mapping[str, Any]) -> list[str]:
    """What DeepSpeed's own config parser rejects in ``section`` (the config without our section).

    DeepSpeed would otherwise reject a bad value (a misspelt ``zero_optimization`` key, an unknown
    offload device) only inside ``deepspeed.initialize``, with an assertion or a traceback, after the
    model was loaded. The batch-size arithmetic depends on the world size, unknown before the process
    group exists, so ``train_batch_size`` and ``gradient_accumulation_steps`` are left to
    :func:`parse_deepspeed` here.
    """
    import deepspeed.utils
    from deepspeed.runtime.config import DeepSpeedConfig

    section = copy.deepcopy(dict(section))
    section.pop("train_batch_size", None)
    section.pop("gradient_accumulation_steps", None)
    section.setdefault("train_micro_batch_size_per_gpu", 1)
    level = deepspeed.utils.logger.level
    deepspeed.utils.logger.setLevel("WARNING")  # it logs its world size at INFO
    try:
        DeepSpeedConfig(section)
    except ValidationError as e:
        prefix = _DEEPSPEED_SECTIONS.get(e.title, e.title)
        return [f"`{'.'.join([*filter(None, [prefix]), *map(str, err['loc'])])}`: {err['msg'].lower()}, "
                f"got {shown(err['input'])}." for err in e.errors()]
    except (AssertionError, ValueError, TypeError, KeyError, AttributeError) as e:
        return [f"{type(e).__name__}: {shown(str(e), 300)}"]
    finally:
        deepspeed.utils.logger.setLevel(level)
    return []
