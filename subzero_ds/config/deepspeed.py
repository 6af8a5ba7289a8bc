"""One typed view of the DeepSpeed settings a ZO run depends on, parsed once and read everywhere.

:func:`parse_deepspeed` reads the config's precision (``bf16``, its alias ``bfloat16``, ``fp16``),
ZeRO stage, parameter offload, ZeRO-3 gather settings, ZeRO++ hpZ's group size, accumulation and
batch sizes into :class:`DeepSpeedSettings`, with DeepSpeed's defaults, and refuses what a ZO run
cannot serve (an optimizer, a scheduler, ZeRO stage 1/2, optimizer offload, quantized weights or
gradients) and what no run can (MiCS, which DeepSpeed removed; an hpZ group that cannot form).
:func:`deepspeed_accepts` runs DeepSpeed's own parser over the rest, so that a value DeepSpeed would
reject deep inside ``deepspeed.initialize`` is reported before any model loads. What the machine and
the launch can do (accelerator precisions, libaio, the NVMe directory, the world size hpZ groups
divide) is checked in ``environment.py``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import SECTION, cut, describe_validation_error, shown

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
    zero_hpz_partition_size: int = Field(1, ge=1, strict=True)  # DeepSpeed's allows 0, "2" and true; we do not


# What a block's key expects, added to pydantic's message about a bad value.
HPZ_EXPECTED = ("an integer >= 1: the GPUs per node (ZeRO++ hpZ keeps a second copy of the parameters partitioned "
                "over each group of that many consecutive ranks, so that gathers stay inside a node); 1, the "
                "default, turns hpZ off.")
_EXPECTED = {"zero_optimization": {"zero_hpz_partition_size": HPZ_EXPECTED}}


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
    hpz_partition_size: int = 1
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
            What no run can have (MiCS keys, an hpZ group size without stage 3 or with NVMe offload) is
            refused either way, and so is an hpZ group size that does not divide the world size the
            launcher announced (``WORLD_SIZE`` and the like, see ``distributed.launcher_world_size``);
            without a launcher, call ``environment.hpz_problems`` once the process group exists.

    Returns:
        The settings (None if there were problems) and every problem found (key, value, fix).
    """
    section = deepspeed_section(ds_config)
    rules = (*EVERY_RUN_RULES, *RULES) if zeroth_order else EVERY_RUN_RULES
    problems = [p for rule in rules for p in [rule(section)] if p]
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
                problems.extend(describe_validation_error(_flatten_locations(error), key, _EXPECTED.get(key)))
    if "zero_optimization" in blocks and blocks["zero_optimization"].stage == 3:
        from ..distributed import launcher_world_size  # not at the top: it imports torch

        world = hpz_world_size_problem(blocks["zero_optimization"].zero_hpz_partition_size, launcher_world_size())
        problems.extend([world] if world else [])
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
        max_reuse_distance=zero.stage3_max_reuse_distance, hpz_partition_size=zero.zero_hpz_partition_size,
        aio_block_size=blocks["aio"].block_size,
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


def no_quantized_weights(section: Mapping[str, Any]) -> str | None:
    # ZeRO++ qwZ (`zero_quantized_weights`) rounds every gathered weight, trainable ones included, to int8 with
    # one scale per group of ~4k elements, and the +eps and -eps forwards see different roundings: the rounding
    # error (a step of max|w|/127) does not cancel in L(w+eps*z) - L(w-eps*z), it competes with the 2*eps*z the
    # projected gradient is the slope of. A simulation of that formula (int8 per 4096-element group, weights
    # N(0, 0.02), a linear loss) gives a median relative error on g of 8% at eps = 1e-3 and 2% at 1e-2.
    # `zero_quantized_nontrainable_weights` is allowed: it stores only parameters with requires_grad=False in int8,
    # once, when DeepSpeed partitions them (deepspeed/runtime/zero/partition_parameters.py), and trainable ones are
    # gathered unquantized. Frozen weights never change and are not perturbed, so every forward of every step
    # sees the same rounded values: the loss is a slightly different function (as in QLoRA), and g is a
    # consistent finite difference of it.
    zero = section.get("zero_optimization")
    if isinstance(zero, Mapping) and zero.get("zero_quantized_weights"):
        return (f"`zero_optimization.zero_quantized_weights` is {shown(zero['zero_quantized_weights'])}, but ZeRO++ "
                "qwZ rounds every gathered weight to int8, differently in the +eps and the -eps forward: in a "
                "simulation that puts 8-10% relative error on the projected gradient at `subzero.eps` 1e-3 (~2% at "
                "1e-2), quantization noise swamping the eps-sized difference ZO training measures. Set it to false. "
                "To cut inter-node traffic use ZeRO++ hpZ instead: `\"zero_hpz_partition_size\": <GPUs per node>` "
                "in `zero_optimization`.")
    return None


def no_quantized_gradients(section: Mapping[str, Any]) -> str | None:
    zero = section.get("zero_optimization")
    if isinstance(zero, Mapping) and zero.get("zero_quantized_gradients"):
        return (f"`zero_optimization.zero_quantized_gradients` is {shown(zero['zero_quantized_gradients'])}, but "
                "ZeRO++ qgZ quantizes the gradients' reduce-scatter, and zeroth-order training computes no "
                "gradients (each step reduces one scalar loss per probe): DeepSpeed would only build its all-to-all "
                "process groups. Set it to false.")
    return None


RULES = (no_optimizer, no_scheduler, batch_sizes, zero_stage, parameter_offload, no_optimizer_offload,
         accumulation_steps, no_quantized_weights, no_quantized_gradients)


# ---- What no run can have, ZO or first-order: refused for both (parse_deepspeed(zeroth_order=False) too) ----

MICS_PREFIX = "mics_"


def no_mics(section: Mapping[str, Any]) -> str | None:
    zero = section.get("zero_optimization")
    keys = [k for k in zero if isinstance(k, str) and k.startswith(MICS_PREFIX)] if isinstance(zero, Mapping) else []
    if not keys:
        return None
    named = " and ".join(f"`zero_optimization.{k}` ({shown(zero[k])})" for k in keys)
    return (f"{named} {'is' if len(keys) == 1 else 'are'} set, but MiCS was removed from DeepSpeed in 0.19.7 (it "
            "now rejects the key; 0.19.6 ignored it without an optimizer, and under MiCS_Init subzero_ds's shard "
            f"ranges would be wrong). Remove {'it' if len(keys) == 1 else 'them'}. To keep parameter gathers "
            "inside a node, use ZeRO++ hpZ, which subzero_ds supports: `\"zero_hpz_partition_size\": <GPUs per "
            "node>` in `zero_optimization` (8 on a DGX).")


def hpz_partition(section: Mapping[str, Any]) -> str | None:
    zero = section.get("zero_optimization")
    size = zero.get("zero_hpz_partition_size", 1) if isinstance(zero, Mapping) else 1
    if isinstance(size, bool) or not isinstance(size, int) or size <= 1:
        return None  # off, or a bad value the block's schema reports
    stage = zero.get("stage", 0)
    if stage != 3:
        return (f"`zero_optimization.zero_hpz_partition_size` is {size}, but hpZ partitions ZeRO-3's parameters a "
                f"second time and `zero_optimization.stage` is {shown(stage)}, where DeepSpeed ignores it. Set "
                "`zero_optimization.stage` to 3, or remove `zero_hpz_partition_size`.")
    offload = zero.get("offload_param")
    if isinstance(offload, Mapping) and offload.get("device") == "nvme":
        # partition_parameters.py allocates the secondary partition with torch.empty(device=remote_device).
        return (f"`zero_optimization.zero_hpz_partition_size` is {size} with `zero_optimization.offload_param.device` "
                "\"nvme\": DeepSpeed allocates hpZ's second partition on the offload device and fails inside "
                "zero.Init on \"nvme\" (torch has no such device). Offload to \"cpu\" (the second partition then "
                "lives in CPU memory), or set `zero_hpz_partition_size` to 1.")
    return None


def hpz_world_size_problem(partition_size: int, world_size: int | None) -> str | None:
    """Whether hpZ groups of ``partition_size`` consecutive ranks tile a world of ``world_size`` ranks.

    DeepSpeed uses groups of ``min(partition_size, world_size)`` ranks and asserts that they divide
    the world only inside ``zero.Init``, on every rank, after the model started loading. A size of
    the world or more is one group of every rank (a multi-node config tried on one node): served.
    ``world_size`` None: not known yet.
    """
    if world_size is None or not 1 < partition_size < world_size or world_size % partition_size == 0:
        return None
    named = [str(d) for d in range(2, min(world_size, 16) + 1) if world_size % d == 0][:4]
    suggestion = (f"e.g. {' or '.join(filter(None, [', '.join(named[:-1]), named[-1]]))}" if named else
                  f"1 or {world_size}")
    return (f"`zero_optimization.zero_hpz_partition_size` is {partition_size} but the world has {world_size} ranks: "
            "hpZ groups are consecutive ranks, so it must divide the world size. Set it to the GPUs per node (8 on "
            f"a DGX), here {suggestion}.")


EVERY_RUN_RULES = (no_mics, hpz_partition)


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
    offload device, a removed feature's key) only inside ``deepspeed.initialize``, with an assertion
    or a traceback, after the model was loaded. The batch-size arithmetic depends on the world size,
    unknown before the process group exists, so ``train_batch_size`` and ``gradient_accumulation_steps``
    are left to :func:`parse_deepspeed` here.

    DeepSpeed's parser stops at the first removed key it finds (``DeepSpeedConfigError``): each is
    reported and left out, and the parser runs again over the rest. A removed key that
    :func:`parse_deepspeed` refuses for every run (MiCS's) is left out without a second report.
    """
    import deepspeed.utils
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    section = copy.deepcopy(dict(section))
    section.pop("train_batch_size", None)
    section.pop("gradient_accumulation_steps", None)
    section.setdefault("train_micro_batch_size_per_gpu", 1)
    problems: list[str] = []
    level = deepspeed.utils.logger.level
    deepspeed.utils.logger.setLevel("WARNING")  # it logs its world size at INFO
    try:
        while True:
            try:
                DeepSpeedConfig(section)
                return problems
            except DeepSpeedConfigError as e:
                key = _removed_key(str(e), section)
                text = cut(str(e), 300)
                if key is None:
                    key = _named_key(str(e), section)
                    return [*problems, f"`{key}`: {text}" if key else f"DeepSpeed's config parser: {text}"]
                if not key.startswith(f"zero_optimization.{MICS_PREFIX}"):  # no_mics reports those
                    problems.append(f"`{key}` is set, but DeepSpeed has removed it: {text} Remove `{key}`.")
                _pop_key(section, key)
    except ValidationError as e:
        prefix = _DEEPSPEED_SECTIONS.get(e.title, e.title)
        return [*problems, *(f"`{'.'.join([*filter(None, [prefix]), *map(str, err['loc'])])}`: "
                             f"{err['msg'].lower()}, got {shown(err['input'])}." for err in e.errors())]
    except (AssertionError, ValueError, TypeError, KeyError, AttributeError) as e:
        return [*problems, f"{type(e).__name__}: {shown(str(e), 300)}"]
    finally:
        deepspeed.utils.logger.setLevel(level)


def _removed_key(message: str, section: Mapping[str, Any]) -> str | None:
    """The key of a ``DeepSpeedConfigError`` about a removed feature, from DeepSpeed's own tables of
    them (``deepspeed/runtime/config.py``; private, so absent tables just find nothing)."""
    import deepspeed.runtime.config as ds_config

    zero = section.get("zero_optimization")
    for prefix, keys, block in (("", "_REMOVED_TOP_LEVEL_CONFIG_KEYS", section),
                                ("zero_optimization.", "_REMOVED_ZERO_CONFIG_KEYS", zero)):
        for key, text in getattr(ds_config, keys, {}).items():
            if text == message and isinstance(block, Mapping) and key in block:
                return prefix + key
    return None


def _named_key(message: str, section: Mapping[str, Any]) -> str | None:
    """The longest dotted key (DeepSpeed also writes ``a::b``) in ``message`` that ``section`` sets."""
    candidates = (m.replace("::", ".") for m in re.findall(r"[A-Za-z_]\w*(?:(?:\.|::)[A-Za-z_]\w*)*", message))
    present = [key for key in candidates if _has_key(section, key)]
    return max(present, key=len, default=None)


def _has_key(section: Mapping[str, Any], dotted: str) -> bool:
    block: Any = section
    for part in dotted.split("."):
        if not isinstance(block, Mapping) or part not in block:
            return False
        block = block[part]
    return True


def _pop_key(section: dict[str, Any], dotted: str) -> None:
    """Remove a dotted key from ``section`` (deepspeed_accepts' own copy)."""
    *parents, last = dotted.split(".")
    block = section
    for part in parents:
        block = block[part]
    block.pop(last)
