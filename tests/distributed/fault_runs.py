"""What the fault tests share (full disk, preemption, hung rank): one small 2-rank CLI run under the deepspeed
launcher, its uninterrupted reference (made once per pytest session), and handles on a running job's ranks.

The run is test_resume's (tiny LLaMA, SST-2 rows, checkpoints) with fewer steps; bit-exactness is checked as
there: identical metrics.jsonl loss rows and identical final weights.
"""

import os
import subprocess
import time
from pathlib import Path

import psutil
import torch

from launch import REPO, RENDEZVOUS_VARIABLES, launcher_command, run
from test_resume import ROWS, final_weights, loss_rows, train_args
from helpers.tiny import save_tiny_pretrained

STEPS, SAVE_EVERY = 12, 4

__all__ = ["STEPS", "SAVE_EVERY", "workspace", "cli_args", "reference", "start", "rank_processes", "wait_for",
           "loss_rows", "final_weights", "same_weights"]


def workspace(tmp_path_factory) -> Path:
    """The model and data files, made once per session."""
    root = tmp_path_factory.getbasetemp() / "faults-workspace"
    if not (root / "dev.tsv").exists():
        root.mkdir(exist_ok=True)
        save_tiny_pretrained(root / "llama", "llama", [t for t, _ in ROWS] + ["It was great terrible"] * 5)
        (root / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in ROWS * 4))
        (root / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in ROWS))
    return root


def cli_args(root: Path, output: Path, *extra: str) -> tuple[str, ...]:
    """``-m subzero_ds.train`` with the fault tests' run (later flags in ``extra`` override earlier ones)."""
    return (*train_args(root, output), "--max_steps", str(STEPS), "--save_steps", str(SAVE_EVERY), *extra)


def reference(tmp_path_factory) -> Path:
    """The output directory of the uninterrupted run (made once per session)."""
    output = tmp_path_factory.getbasetemp() / "faults-reference"
    if not (output / "final").is_dir():
        finished = run("deepspeed", 2, *cli_args(workspace(tmp_path_factory), output), timeout=600)
        assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    return output


def start(args: tuple[str, ...], log: Path) -> subprocess.Popen:
    """The deepspeed launcher with 2 ranks running ``args``, in its own session (its process group can be
    signalled whole), output to ``log``."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}
    with open(log, "w") as out:
        return subprocess.Popen([*launcher_command("deepspeed", 2), "--module", *args[1:]], cwd=REPO,
                                env={**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def rank_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The job's training ranks, in local-rank order."""
    ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
             if "subzero_ds.train" in " ".join(p.cmdline()) and any(a.startswith("--local_rank=") for a in p.cmdline())]
    return sorted(ranks, key=lambda p: next(a for a in p.cmdline() if a.startswith("--local_rank=")))


def wait_for(condition, launcher: subprocess.Popen, log: Path, what: str, timeout: float = 300) -> None:
    """Poll ``condition()`` until true; fail (with the job's output) if the job ends or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert launcher.poll() is None, f"the job ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def same_weights(a: Path, b: Path) -> bool:
    """Whether two runs' final/ weights are bit-identical."""
    x, y = final_weights(a), final_weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
