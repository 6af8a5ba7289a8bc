"""ZOTrainer on SIGTERM: every rank stops after the same step, the Trainer's checkpoint-N is saved and the process
exits with code 4; train(resume_from_checkpoint=True) then ends with the uninterrupted run's weights."""

import os
from pathlib import Path

import pytest
import torch

from launch import REPO, run
from subzero_ds.faults import ExitCode

pytestmark = pytest.mark.distributed
SCRIPT = str(Path(__file__).with_name("trainer_preemption.py"))


def test_a_preempted_trainer_saves_exits_4_and_resumes_bit_exactly(tmp_path, monkeypatch):
    # A script's own directory heads sys.path, not the checkout: make its ranks import this checkout's package.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    reference, workdir = tmp_path / "uninterrupted", tmp_path / "preempted"
    done = run("deepspeed", 2, SCRIPT, "--mode", "uninterrupted", "--workdir", str(reference), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    stopped = run("deepspeed", 2, SCRIPT, "--mode", "preempted", "--workdir", str(workdir), timeout=600)
    assert stopped.returncode == ExitCode.PREEMPTED, stopped.stdout[-2000:] + stopped.stderr[-3000:]
    checkpoint = workdir / "out" / "checkpoint-3"  # rank 1 got SIGTERM in step 3; rank 0 stopped there too
    assert f"SIGTERM received: stopped after step 3 and saved {checkpoint}" in stopped.stderr
    assert (checkpoint / "zo" / "checkpoint-3" / "manifest.json").is_file()
    assert not (workdir / "weights.pt").exists()  # the script did not go on past train()

    resumed = run("deepspeed", 2, SCRIPT, "--mode", "resume", "--workdir", str(workdir), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    expected, got = torch.load(reference / "weights.pt"), torch.load(workdir / "weights.pt")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
