"""Ranks that disagree on the model or the training data are stopped at start, with the reason."""

import os
import shutil
import subprocess
import sys

import pytest

from launch import REPO, RENDEZVOUS_VARIABLES, run
from subzero_ds.distributed import free_port

pytestmark = pytest.mark.distributed
SCRIPT = str(REPO / "tests" / "distributed" / "launching" / "trajectory.py")


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}


def test_ranks_with_different_models_are_stopped_at_initialize(tmp_path):
    finished = run("deepspeed", 2, SCRIPT, "--out", str(tmp_path / "x.pt"), "--cases", "opt-zero3-subzero",
                   "--model_differs_per_rank")
    assert finished.returncode != 0
    assert "ranks disagree on model" in finished.stdout + finished.stderr
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (apt-get install openmpi-bin)")
def test_ranks_reading_different_training_data_are_stopped(tmp_path):
    from helpers.tiny import save_tiny_pretrained

    rows = [("a great film", 1), ("a fine story", 1), ("a dull mess", 0), ("a bad story", 0)] * 4
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    save_tiny_pretrained(tmp_path / "llama", "llama", [t for t, _ in rows])
    common = ["-m", "subzero_ds.train", "--model_name_or_path", str(tmp_path / "llama"), "--task", "sst2",
              "--train_file", str(tmp_path / "train.tsv"), "--validation_file", str(tmp_path / "train.tsv"),
              "--num_train", "8", "--max_steps", "2", "--output_dir", str(tmp_path / "out")]
    # MPMD: rank 0 and rank 1 sample their 8 training examples with different seeds.
    port = f"MASTER_PORT={free_port()}"
    context = ["-np", "1", "-x", port, "-x", "PATH", "-x", "OMP_NUM_THREADS=1", sys.executable]
    finished = subprocess.run([shutil.which("mpirun"), "--allow-run-as-root", "--oversubscribe", *context, *common,
                               "--seed", "1", ":", *context, *common, "--seed", "2"],
                              cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert finished.returncode != 0
    assert "ranks disagree on the training data" in finished.stderr
    assert "Traceback" not in finished.stderr
