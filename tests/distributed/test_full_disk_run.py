"""A 2-rank CLI run whose --output_dir is a 1.2 MB tmpfs: warned at start, stopped with one message and
exit code 3 when a checkpoint no longer fits, nothing partial left; its last checkpoint resumes bit-exactly."""

import pytest

from fault_runs import cli_args, loss_rows, reference, same_weights, workspace
import helpers.tmpfs
from launch import run
from subzero_ds.checkpoint.sharded import latest_checkpoint
from subzero_ds.faults import ExitCode

pytestmark = pytest.mark.distributed


@pytest.fixture
def small_tmpfs(tmp_path):
    with helpers.tmpfs.small_tmpfs(tmp_path) as mount_point:
        yield mount_point


def test_a_full_output_disk_stops_the_run_with_one_message_and_the_last_checkpoint_resumes(
        tmp_path_factory, small_tmpfs, tmp_path):
    root, output = workspace(tmp_path_factory), small_tmpfs / "run"
    full = run("deepspeed", 2, *cli_args(root, output), timeout=600)
    assert full.returncode == ExitCode.DISK_FULL, full.stdout[-2000:] + full.stderr[-2000:]
    assert "warning: " in full.stdout and "the run will stop when the disk is full" in full.stdout  # at start
    errors = [line for line in full.stderr.splitlines() if line.startswith("subzero-train: error:")]
    assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    last_good = latest_checkpoint(output / "checkpoints")
    assert last_good is not None and f"the last good checkpoint is {last_good}" in errors[0]
    assert "are free there" in errors[0] and "could not be written to" in errors[0]
    assert not list((output / "checkpoints").glob(".*.partial"))

    resumed = tmp_path / "resumed"  # on a disk with room
    finished = run("deepspeed", 2, *cli_args(root, resumed, "--resume", str(last_good)), timeout=600)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    uninterrupted = reference(tmp_path_factory)
    step = int(last_good.name.split("-")[1])
    assert loss_rows(resumed) == [r for r in loss_rows(uninterrupted) if r[0] > step]
    assert same_weights(resumed, uninterrupted)
