"""Processes of a benchmark: the launched ranks, the fresh workers they start, and how they time and exit."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import psutil
import torch
import torch.distributed as dist

from subzero_ds.distributed import exit_process, free_port, init_distributed, log

T = TypeVar("T")
BENCH = Path(__file__).resolve().parents[1]  # bench/: a worker imports this package from there


def run_fresh_workers(command: list[str], env: dict[str, str], timeout: float, name: str) -> list[dict[str, Any]] | None:
    """Run ``command`` in a fresh worker process on this rank (every rank does) and gather their results.

    The workers of all ranks form their own process group on a fresh port (``MASTER_PORT``); bench/
    is on their ``PYTHONPATH``. Each writes its result as JSON to the path ``--result <path>``
    (appended to ``command``) names.

    Args:
        command: the worker's command line, without ``--result``.
        env: its environment (``MASTER_PORT`` and ``PYTHONPATH`` are set here).
        timeout: seconds before the worker is killed.
        name: what the worker measures, for the error message.

    Returns:
        Every rank's result on rank 0 (None elsewhere).

    Raises:
        RuntimeError: a worker failed or timed out on some rank.
    """
    port = broadcast(free_port() if dist.get_rank() == 0 else None)
    python_path = os.pathsep.join(filter(None, [str(BENCH), env.get("PYTHONPATH")]))
    env = {**env, "MASTER_PORT": str(port), "PYTHONPATH": python_path}
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        try:
            completed = subprocess.run([*command, "--result", str(result_path)], env=env, timeout=timeout)
            failure = None if completed.returncode == 0 else f"exit status {completed.returncode}"
        except subprocess.TimeoutExpired:
            failure = f"no result after {timeout:.0f} s"
        finally:  # a killed worker leaves DeepSpeed's 66 MB /dev/shm buffer behind: remove it
            address, local_rank = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("LOCAL_RANK", "0")
            for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{address}_{port}_{local_rank}"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        result = json.loads(result_path.read_text()) if failure is None else {"failure": failure}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    failures = [f"rank {rank}: {r['failure']}" for rank, r in enumerate(gathered) if "failure" in r]
    if failures:
        raise RuntimeError(f"the {name} worker failed ({'; '.join(failures)}); see its log above")
    return gathered if dist.get_rank() == 0 else None


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


def rss_mib() -> float:
    """This process's resident set size now, in MiB."""
    return psutil.Process().memory_info().rss / 2**20


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


def run_launched(args: Any, run_all: Callable[[Any], list], report: Callable[..., str], name: str) -> None:
    """The launched process of a benchmark (one per rank): ``run_all(args)`` runs every case in fresh
    workers; rank 0 renders ``report(rows, args, world_size, wall_seconds)`` and publishes it."""
    from harness.report import publish

    show_progress()
    init_distributed()
    rows = run_or_exit(lambda: run_all(args))
    if dist.get_rank() == 0:
        publish(report(rows, args, dist.get_world_size(), wall_seconds()), args.output, name)
    exit_cleanly(0)
