"""Processes of a benchmark: the launched ranks, the fresh workers they start, and how they time and exit."""

from __future__ import annotations

import logging
import resource
import time
from typing import Any, Callable, TypeVar

import psutil
import torch
import torch.distributed as dist

from subzero_ds.distributed import exit_process, log

T = TypeVar("T")


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def synchronize() -> None:
    """Wait for this rank's queued GPU work (a no-op on CPU), so wall times cover the kernels."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn`` takes on this rank (its GPU work included), started right after a barrier."""
    synchronize()
    dist.barrier()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def wall_seconds() -> float:
    """Seconds since this process started."""
    return time.time() - psutil.Process().create_time()


def exit_cleanly(status: int) -> None:
    """Barrier, tear the process group down, remove DeepSpeed's /dev/shm buffer, and leave at once.

    A 2-rank ZeRO-3 process sometimes aborts at interpreter exit ("terminate called without an
    active exception"); :func:`subzero_ds.distributed.exit_process` exits right after
    ``destroy_process_group`` and unlinks the 66 MB all-reduce buffer DeepSpeed's CPU comm op
    leaves in /dev/shm for every process (one per worker here).
    """
    exit_process(status)


def show_progress() -> None:
    """Print subzero_ds's INFO lines (the benchmarks' progress) with timestamps."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger("subzero_ds").addHandler(handler)
    logging.getLogger("subzero_ds").setLevel(logging.INFO)


def run_or_exit(run: Callable[[], T]) -> T:
    """``run()``; a RuntimeError (a failed worker) is logged on every rank and ends the process with status 1."""
    try:
        return run()
    except RuntimeError as error:
        log(str(error), all_ranks=True)
        exit_cleanly(1)
