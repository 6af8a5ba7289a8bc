"""Helpers that launch a script on several CPU ranks with the real launchers."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from subzero_ds.distributed import free_port

REPO = Path(__file__).resolve().parents[3]
TRAJECTORY = str(Path(__file__).resolve().parent / "trajectory.py")
BIN = Path(sys.executable).parent
RENDEZVOUS_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launcher_command(launcher: str, nprocs: int) -> list[str]:
    """The command prefix that starts ``nprocs`` ranks of a Python script with ``launcher``."""
    if launcher == "python":
        return [sys.executable]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port())]
    if launcher == "mpirun":
        mpirun = shutil.which("mpirun")
        port = str(free_port())
        return [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", str(nprocs), "-x", f"MASTER_PORT={port}",
                "-x", "PATH", sys.executable]
    raise ValueError(launcher)


def run(launcher: str, nprocs: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``args`` (a script and its arguments) under ``launcher``; returns the finished process.

    ``launcher``: "python" (one plain process), "deepspeed", "mpirun", or "ranks": the ranks started
    directly with the variables torchrun sets, for tests whose subject is not the launcher (the
    deepspeed launcher imports DeepSpeed twice before a rank starts: ~8 s a launch here).
    """
    if launcher == "deepspeed" and args[0] == "-m":
        args = ("--module", *args[1:])  # the deepspeed launcher's spelling of python -m
    # In-process tests set RANK/MASTER_PORT… for pytest's own 1-rank group; a child must not reuse them.
    inherited = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}
    env = {**inherited, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if launcher == "ranks":
        return run_ranks(nprocs, args, env, timeout)
    return subprocess.run(
        [*launcher_command(launcher, nprocs), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_ranks(nprocs: int, args: tuple[str, ...], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``nprocs`` ranks of ``python ARGS`` on this host, stopped together as a launcher stops them: when one
    exits non-zero the others are killed. Returns the first failing rank's code (else 0) and every
    rank's output, rank by rank."""
    command = [sys.executable, *args]
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nprocs),
                  "LOCAL_WORLD_SIZE": str(nprocs)}
    with tempfile.TemporaryDirectory() as scratch:
        logs = [(Path(scratch, f"{rank}.out"), Path(scratch, f"{rank}.err")) for rank in range(nprocs)]
        ranks = []
        for rank, (out, err) in enumerate(logs):
            with open(out, "w") as stdout, open(err, "w") as stderr:  # the child keeps its own copies
                ranks.append(subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr,
                                              env={**env, **rendezvous, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
        deadline = time.monotonic() + timeout
        try:
            while True:
                codes = [p.poll() for p in ranks]
                failed = next((code for code in codes if code not in (None, 0)), None)
                if failed is not None or None not in codes:
                    break
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(command, timeout)
                time.sleep(0.1)
        finally:
            for p in ranks:
                if p.poll() is None:
                    p.kill()
                p.wait()
        stdout = "".join(out.read_text() for out, _ in logs)
        stderr = "".join(err.read_text() for _, err in logs)
    return subprocess.CompletedProcess(command, failed or 0, stdout, stderr)


def trajectories(tmp_path_factory, launcher: str, nprocs: int) -> dict:
    """Every case of trajectory.py under ``launcher`` on ``nprocs`` ranks: its results, by case (the 1-rank
    reference of the ``one_rank`` fixture, and test_equivalence.py's 2 ranks)."""
    out = tmp_path_factory.mktemp(launcher) / "trajectories.pt"
    finished = run(launcher, nprocs, TRAJECTORY, "--out", str(out))
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    saved = torch.load(out)
    assert saved["world_size"] == nprocs
    return saved["results"]
