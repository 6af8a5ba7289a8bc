"""scripts/gpu_check.sh on this CPU-only machine: it says so plainly, runs nothing and exits 0."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "REPORT": str(tmp_path / "gpu" / "report.md")}
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_without_a_gpu_it_says_so_and_runs_nothing(tmp_path):
    done = run(str(tmp_path / "wheelhouse"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no NVIDIA GPU" in done.stdout and "nothing was run" in done.stdout
    assert not (tmp_path / "gpu").exists()  # no report, no logs, no environment made


def test_bad_arguments_get_the_usage(tmp_path):
    done = run("--bogus", tmp_path=tmp_path)
    assert done.returncode == 2 and "usage: scripts/gpu_check.sh" in done.stderr
