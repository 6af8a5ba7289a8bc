"""Everything that knows about ranks, process groups and launcher environment variables."""

from __future__ import annotations

import contextlib
import datetime
import glob
import logging
import os
import socket
import sys
from typing import Any, Mapping

import torch
import torch.distributed as dist

from .kernels.build_locks import clear_stale_build_locks

logger = logging.getLogger("subzero_ds")

# Seconds a collective waits for the other ranks by default (torch's NCCL default; gloo's is 30 minutes).
DEFAULT_COLLECTIVE_TIMEOUT = 600.0

# Set by torchrun/deepspeed (RANK), Open MPI, MPICH/Intel MPI (PMI_RANK) and slurm.
_LAUNCHER_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


# Ranks on this node: deepspeed (LOCAL_SIZE), torchrun, Open MPI, MPICH, slurm.
_LOCAL_SIZE_VARIABLES = (
    "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE",
)


# This process's rank on its node: deepspeed/torchrun, Open MPI, MPICH/Intel MPI, slurm.
_LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")


# The world size a launcher announces to every process: the deepspeed launcher and torchrun (WORLD_SIZE),
# Open MPI's mpirun (OMPI_COMM_WORLD_SIZE), MPICH and Intel MPI (PMI_SIZE). Not slurm's SLURM_NTASKS: one
# task may run the deepspeed launcher, which starts several ranks.
_LAUNCHER_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launcher_world_size() -> int | None:
    """The number of ranks the launcher started, before any process group exists; None without a launcher.

    ``init_distributed`` sets ``WORLD_SIZE=1`` in a process started without one, so after it this
    reads 1 there (a world no hpZ size is refused for).
    """
    for variable in _LAUNCHER_WORLD_SIZE_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return None


def is_local_main_process() -> bool:
    """True on the first rank of each node, or without a launcher; works before the process group exists.

    One process per node is the one to report a user error found before or outside collectives:
    ranks on one node read the same files, so their messages would repeat rank 0's.
    """
    return local_rank() == 0


def get_world_size_and_rank() -> tuple[int, int]:
    """(world size, global rank), or (1, 0) when no process group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def is_main_process() -> bool:
    """True on global rank 0 (and without a process group)."""
    return get_world_size_and_rank()[1] == 0


def init_distributed(timeout: float = DEFAULT_COLLECTIVE_TIMEOUT) -> None:
    """Start the process group the way the launcher asks (deepspeed, mpirun, slurm, or none).

    A plain ``python`` process (no launcher variables) becomes a 1-rank group on a free local
    port, so it never collides with another job's default port 29500.

    Args:
        timeout: seconds a collective waits for the other ranks before it raises (the group's
            timeout; a group that exists already keeps its own: see :func:`set_collective_timeout`).

    Raises:
        BuildLockError: a JIT build lock that may be stale but cannot be cleared safely (see
            :mod:`subzero_ds.kernels.build_locks`).
    """
    if dist.is_initialized():
        return
    if not any(v in os.environ for v in _LAUNCHER_RANK_VARIABLES):
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    _share_cores_between_local_ranks()
    _select_local_device()
    clear_stale_build_locks()  # deepspeed.init_distributed JIT-builds its shm comm op: a stale lock hangs it forever
    import deepspeed

    # Under mpirun DeepSpeed's MPI discovery sets MASTER_PORT to this argument (default 29500), ignoring
    # the user's: two mpirun jobs on one host would collide.
    deepspeed.init_distributed(distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
                               timeout=datetime.timedelta(seconds=timeout))
    # Every rank has mapped its peers' shm buffers once all have returned: the names can go now,
    # so even a rank that is SIGKILLed (or a process that never calls exit_process) leaks nothing.
    barrier()
    _unlink_shared_memory_buffer()


def set_collective_timeout(seconds: float) -> None:
    """Give the existing default process group (one a Trainer or accelerate started) this collective timeout."""
    from torch.distributed.distributed_c10d import _set_pg_timeout  # no public API changes a live group's timeout

    _set_pg_timeout(datetime.timedelta(seconds=seconds))


def _share_cores_between_local_ranks() -> None:
    """Give each rank its share of the host's cores unless the user set OMP_NUM_THREADS.

    Every rank otherwise starts one thread per core: with 2 ranks on 2 cores, that
    oversubscription made a step 5x slower here. On GPU nodes the host threads run the ZO
    arithmetic of shards offloaded to the host (``offload_param``), so they are split too.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_size = next((int(os.environ[v]) for v in _LOCAL_SIZE_VARIABLES if v in os.environ), 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))


def local_rank() -> int:
    """This process's rank on its node (0 without a launcher)."""
    return int(next((os.environ[v] for v in _LOCAL_RANK_VARIABLES if v in os.environ), "0"))


def _select_local_device() -> None:
    """Bind this rank to its GPU before the first collective or allocation.

    NCCL communicators are created on the current device: without this, every rank of a node
    would use GPU 0 for the barriers and all-reduces that run before DeepSpeed picks the device.
    """
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())


def collective_device() -> torch.device:
    """The device the process group's collectives take tensors on: the accelerator under NCCL, else the host."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() not in ("gloo", "mpi"):
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())
    return torch.device("cpu")


def shutdown() -> None:
    """Tear the process group down (call at the very end of a training script)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """End a training process: tear down the process group, finalize MPI, then exit at once.

    Exiting without interpreter teardown avoids an abort DeepSpeed's ZeRO-3 sometimes hits
    there ("terminate called without an active exception"); MPI must still be finalized or
    ``mpirun`` reports the rank as failed. A W&B run (DeepSpeed's ``wandb`` monitor) is finished
    first: its rows are sent by a service that dies with the process.
    """
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=code)
    if code == 0:
        shutdown()
    _unlink_shared_memory_buffer()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _unlink_shared_memory_buffer() -> None:
    """Remove this rank's /dev/shm all-reduce buffer of DeepSpeed's CPU shm comm op.

    DeepSpeed creates one (66 MB) per rank and never unlinks it: seen here, 342 of them from
    earlier runs filled /dev/shm (22 GB) until the OOM killer stopped the next job.
    Unlinking leaves the mappings that this rank and its peers already hold intact.
    """
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    _, rank = get_world_size_and_rank()  # the buffer is named after the rank DeepSpeed initialized with
    if address and port:
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{address}_{port}_{rank}"):
            with contextlib.suppress(OSError):
                os.unlink(path)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(*values: float) -> list[float]:
    """Average scalars over all ranks in one all-reduce (the only collective a ZO step adds)."""
    world_size, _ = get_world_size_and_rank()
    return [v / world_size for v in sum_over_ranks(*values)]


def sum_over_ranks(*values: float) -> list[float]:
    """Sum scalars over all ranks in one all-reduce (float64, on the collective device)."""
    packed = torch.tensor(values, dtype=torch.float64, device=collective_device())
    if get_world_size_and_rank()[0] > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return packed.tolist()


def all_gather_objects(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (a list of one without a process group)."""
    world_size, _ = get_world_size_and_rank()
    if world_size == 1 or not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def disagreements(values: Mapping[str, int]) -> list[str]:
    """Names of the integer ``values`` that are not the same on every rank."""
    world_size, _ = get_world_size_and_rank()
    if world_size == 1:
        return []
    packed = torch.tensor(list(values.values()), dtype=torch.int64, device=collective_device())
    low, high = packed.clone(), packed.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return [name for name, lo, hi in zip(values, low.tolist(), high.tolist()) if lo != hi]


def log(message: str, *, all_ranks: bool = False) -> None:
    """Log ``message`` on rank 0 (or on every rank, prefixed with its rank)."""
    world_size, rank = get_world_size_and_rank()
    if all_ranks:
        logger.info(f"[rank {rank}/{world_size}] {message}")
    elif rank == 0:
        logger.info(message)


def free_port() -> int:
    """A local TCP port nobody listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
