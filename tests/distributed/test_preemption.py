"""Preemption of a 2-rank CLI run: SIGTERM/SIGUSR1 (as slurm sends it to every task) stops every rank after
the same step with a checkpoint and exit code 4; --resume then ends bit-exactly where an uninterrupted run does."""

import json
import os
import signal
import time

import pytest

from fault_runs import (STEPS, cli_args, loss_rows, rank_processes, reference, same_weights, start, wait_for,
                        workspace)
from launch import run
from subzero_ds.checkpoint.sharded import latest_checkpoint
from subzero_ds.faults import ExitCode

pytestmark = pytest.mark.distributed


def steps_done(output):
    rows = output / "metrics.jsonl"
    return len(loss_rows(output)) if rows.exists() else 0


@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGUSR1", "SIGTERM")], ids=["SIGTERM", "twice"])
def test_a_signal_mid_run_checkpoints_the_step_reached_and_the_resume_is_bit_exact(tmp_path_factory, tmp_path,
                                                                                    signals):
    root, output, log = workspace(tmp_path_factory), tmp_path / "run", tmp_path / "run.log"
    uninterrupted = reference(tmp_path_factory)
    job = start(cli_args(root, output), log)
    try:
        wait_for(lambda: steps_done(output) >= 2, job, log, "step 2")
        ranks = rank_processes(job)
        for rank in ranks[::-1]:  # the ranks get it at different moments
            os.kill(rank.pid, getattr(signal, signals[0]))
            time.sleep(0.05)
        if len(signals) > 1:  # again, while the checkpoint is written (the next partial directory appears)
            wait_for(lambda: list((output / "checkpoints").glob(".*.partial")) or job.poll() is not None
                     or any(not r.is_running() for r in ranks), job, log, "the save", timeout=60)
            for rank in ranks:
                if rank.is_running():
                    os.kill(rank.pid, getattr(signal, signals[1]))
        code = job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == ExitCode.PREEMPTED, text[-3000:]
    checkpoint = latest_checkpoint(output / "checkpoints")
    step = json.loads((checkpoint / "manifest.json").read_text())["step"]
    assert 2 <= step < STEPS and checkpoint.name == f"checkpoint-{step}"
    assert f"{signals[0]} received: stopped after step {step} and wrote {checkpoint}" in text
    assert max(r[0] for r in loss_rows(output)) == step  # every rank stopped after that same step
    assert "Traceback" not in text and not (output / "final").exists()

    resumed = run("deepspeed", 2, *cli_args(root, output, "--resume"), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resumed from {checkpoint}" in resumed.stdout
    assert loss_rows(output) == loss_rows(uninterrupted)  # bit-identical losses, no duplicated rows
    assert same_weights(output, uninterrupted)
