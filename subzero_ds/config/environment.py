"""What this machine and launch can do for a config: accelerator precisions, NVMe offload's directory
and libaio, swap buffers large enough for the model's partitions, and a world size that hpZ groups
divide. These probe the machine (the accelerator, the file system, a compiler), so they stay out of
the schema modules.
"""

from __future__ import annotations

import os
from typing import Mapping

from .deepspeed import DeepSpeedSettings, Precision, hpz_world_size_problem
from .errors import shown

NVME_PATH_KEY = "zero_optimization.offload_param.nvme_path"


def hpz_problems(settings: DeepSpeedSettings, world_size: int) -> list[str]:
    """Whether hpZ's groups of ``settings.hpz_partition_size`` consecutive ranks tile the world (a size of the
    world or more: one group of every rank, as DeepSpeed forms it).

    Call once the world size is known (after ``init_distributed``) and before ``deepspeed.initialize``:
    DeepSpeed asserts this only inside ``zero.Init``, as an AssertionError on every rank.
    :func:`~subzero_ds.config.deepspeed.parse_deepspeed` already checks it against the launcher's world
    size where a launcher announced one.

    Args:
        settings: the DeepSpeed settings.
        world_size: ranks in the run.

    Returns:
        The problem (key, value, world size, fix), or nothing.
    """
    if settings.stage != 3:
        return []  # hpZ without stage 3 is refused by parse_deepspeed
    problem = hpz_world_size_problem(settings.hpz_partition_size, world_size)
    return [problem] if problem else []


def unsupported_precision(settings: DeepSpeedSettings) -> list[str]:
    """The half precision the config enables, if this machine's accelerator lacks it.

    DeepSpeed checks this only inside ``deepspeed.initialize`` ("Type fp16 is not supported on your
    device"); a CPU without AVX-512 FP16 (most of them) has bf16 but not fp16.
    """
    if settings.precision is Precision.FP32:
        return []
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    key = settings.precision.value
    supported = accelerator.is_bf16_supported() if key == "bf16" else accelerator.is_fp16_supported()
    other = "fp16" if key == "bf16" else "bf16"
    if supported:
        return []
    return [f"`{key}.enabled`: this machine's {accelerator.device_name()} accelerator does not support {key}, got true. "
            f"Train in fp32 (remove the \"{key}\" block) or set \"{other}\": {{\"enabled\": true}} if it supports that."]


def nvme_offload_problems(settings: DeepSpeedSettings) -> list[str]:
    """Whether NVMe offload can start, before any work does (call before ``deepspeed.initialize``).

    ``nvme_path`` must be an existing, writable directory (DeepSpeed would create a mistyped path
    silently, on whatever disk it lands on, or fail deep inside ``zero.Init``), and DeepSpeed's
    ``async_io`` op must be buildable (it needs libaio). Other devices need nothing.
    """
    if not settings.offloads_to_nvme or not settings.nvme_path:
        return []  # not NVMe, or a missing nvme_path that parse_deepspeed reports
    path = os.fspath(settings.nvme_path)
    problems = []
    if not os.path.exists(path):
        problems.append(
            f"`{NVME_PATH_KEY}` is {shown(path)}, which does not exist. Create it (`mkdir -p {path}`) on the NVMe "
            "drive, or point it at an existing directory there: DeepSpeed writes one swap file per parameter "
            "partition in it.")
    elif not os.path.isdir(path):
        problems.append(f"`{NVME_PATH_KEY}` is {shown(path)}, which is a file, not a directory. Point it at a "
                        "directory on the NVMe drive.")
    elif not os.access(path, os.W_OK | os.X_OK):
        problems.append(f"`{NVME_PATH_KEY}` is {shown(path)}, which this user cannot write to. Make it writable "
                        f"(`chmod u+w {path}`) or choose a directory you own on the NVMe drive.")
    if not async_io_available():
        problems.append(
            "`zero_optimization.offload_param.device` is \"nvme\", but DeepSpeed's async_io op cannot be built: "
            "libaio is missing. Install it (`apt-get install libaio-dev`, or run scripts/setup.sh) and check "
            "`ds_report` lists async_io as compatible, or offload to \"cpu\" instead.")
    return problems


def nvme_buffer_problems(settings: DeepSpeedSettings, param_numels: Mapping[str, int], world_size: int) -> list[str]:
    """Whether every parameter partition DeepSpeed will swap to NVMe fits one swap buffer.

    DeepSpeed swaps a partition of ``ceil(numel / world_size)`` elements to NVMe when it holds at
    least ``max(1 MiB, aio.block_size)`` bytes, and asserts inside ``zero.Init`` ("More elements …
    than buffer size") when it exceeds ``offload_param.buffer_size`` (elements, default 1e8).

    Args:
        settings: the DeepSpeed settings.
        param_numels: full (unpartitioned) element count of every parameter, by name.
        world_size: ranks the parameters are partitioned over.
    """
    if not settings.offloads_to_nvme or not param_numels:
        return []
    swappable_bytes = max(1024**2, settings.aio_block_size)
    name, numel = max(param_numels.items(), key=lambda item: item[1])
    partition = -(-numel // world_size)
    if partition * settings.precision.bytes < swappable_bytes or partition <= settings.nvme_buffer_size:
        return []
    return [f"`zero_optimization.offload_param.buffer_size` is {settings.nvme_buffer_size:,} elements, but parameter "
            f"{name!r} ({numel:,} elements) has partitions of {partition:,} elements over {world_size} ranks, and each "
            "partition is swapped through one buffer. Set `zero_optimization.offload_param.buffer_size` to at least "
            f"{partition}."]


def async_io_available() -> bool:
    """Whether DeepSpeed's async_io op (NVMe swapping) can be built here (compiles a libaio probe)."""
    import contextlib
    import io

    from deepspeed.ops.op_builder import AsyncIOBuilder

    with contextlib.redirect_stdout(io.StringIO()):  # it echoes the gcc commands of its probe
        return bool(AsyncIOBuilder().is_compatible(verbose=False))
