"""Helpers that launch a script on several CPU ranks with the real launchers."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from subzero_ds.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
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
    """Run ``args`` (a script and its arguments) under ``launcher``; returns the finished process."""
    if launcher == "deepspeed" and args[0] == "-m":
        args = ("--module", *args[1:])  # the deepspeed launcher's spelling of python -m
    # In-process tests set RANK/MASTER_PORT… for pytest's own 1-rank group; a child must not reuse them.
    inherited = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}
    env = {**inherited, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(
        [*launcher_command(launcher, nprocs), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
