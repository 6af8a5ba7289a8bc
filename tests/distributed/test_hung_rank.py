"""A hung rank (SIGSTOP: a wedged GPU, a stalled file system) with --collective_timeout 20: the live rank stops
with one message naming the step and the last checkpoint, exit code 5, the job ends within 90 s; the last
checkpoint then resumes bit-exactly."""

import os
import signal
import time

import pytest

from fault_runs import SAVE_EVERY, cli_args, loss_rows, rank_processes, reference, same_weights, start, wait_for, workspace
from launch import run
from subzero_ds.checkpoint.sharded import checkpoint_dir
from subzero_ds.faults import ExitCode

pytestmark = pytest.mark.distributed


def test_a_stopped_rank_ends_the_job_with_a_message_and_the_last_checkpoint_resumes(tmp_path_factory, tmp_path):
    root, output, log = workspace(tmp_path_factory), tmp_path / "run", tmp_path / "run.log"
    uninterrupted = reference(tmp_path_factory)
    checkpoint = checkpoint_dir(output / "checkpoints", SAVE_EVERY)
    job = start(cli_args(root, output, "--collective_timeout", "20"), log)
    stopped = None
    try:
        wait_for(lambda: (checkpoint / "manifest.json").exists(), job, log, f"{checkpoint.name}")
        stopped = rank_processes(job)[0]  # rank 0: the live rank 1, not the first on its node, must report it
        stopped.suspend()  # SIGSTOP
        since = time.monotonic()
        code = job.wait(timeout=150)
        took = time.monotonic() - since
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        if stopped is not None and stopped.is_running():
            stopped.kill()
    text = log.read_text()
    print(f"the job ended {took:.0f} s after its rank 0 was stopped, exit code {code}")
    assert code == ExitCode.COLLECTIVE_TIMEOUT, text[-3000:]
    assert took < 90
    errors = [line for line in text.splitlines() if "subzero-train: error:" in line]
    assert len(errors) == 1, text[-3000:]  # rank 1's; rank 0 was stopped
    message = errors[0]
    assert "rank 1 of 2 waited 20 s for the other ranks during " in message
    assert "step" in message and f"The last good checkpoint is {checkpoint}" in message
    assert "--resume" in message and "--collective_timeout" in message
    assert "Traceback" not in text

    resumed = run("deepspeed", 2, *cli_args(root, output, "--resume", str(checkpoint)), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert loss_rows(output) == loss_rows(uninterrupted)
    assert same_weights(output, uninterrupted)
