"""DeepSpeed's multi-node settings a ZO run cannot serve, through ``python -m subzero_ds.train``: every
one listed in one message, exit code 2, no traceback, before the model (here a directory that does not
exist) is looked at. The same refusals one by one: tests/config/test_multinode_config.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_launched_rank_refuses_mics_qwz_qgz_and_an_hpz_size_the_world_does_not_divide(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na fine film\t1\na dull film\t0\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngreat\t1\nbad\t0\n")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "mics_shard_size": 2, "zero_quantized_weights": True, "zero_quantized_gradients": True,
        "zero_hpz_partition_size": 3}, "subzero": {"lr": 1e-5}}))
    model = tmp_path / "no_such_model"
    argv = ["--train_file", str(tmp_path / "train.tsv"), "--validation_file", str(tmp_path / "dev.tsv"),
            "--deepspeed_config", str(config), "--model_name_or_path", str(model),
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
    # A rank as the deepspeed launcher starts it, minus the rendezvous it never gets to.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR",
                                                            "LOCAL_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")}
    finished = subprocess.run([sys.executable, "-m", "subzero_ds.train", *argv], check=False, cwd=REPO,
                              capture_output=True, text=True, timeout=240,
                              env={**env, "WORLD_SIZE": "4", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"})
    stderr = finished.stderr
    assert finished.returncode == 2 and "Traceback" not in stderr + finished.stdout, stderr[-3000:]
    assert stderr.startswith("subzero-train: error: ") and str(config) in stderr, stderr[-3000:]
    for fragment in ["`zero_optimization.mics_shard_size` (2) is set", "removed from DeepSpeed in 0.19.7",
                     '"zero_hpz_partition_size": <GPUs per node>',
                     "`zero_optimization.zero_quantized_weights` is True", "8-10% relative error", "Set it to false",
                     "`zero_optimization.zero_quantized_gradients` is True", "computes no gradients",
                     "`zero_optimization.zero_hpz_partition_size` is 3 but the world has 4 ranks", "here e.g. 2 or 4"]:
        assert fragment in stderr, (fragment, stderr[-3000:])
    assert stderr.count("\n  - ") == 4, stderr  # each once: DeepSpeed's own MiCS error is not repeated
    assert "MiCS ZeRO-3 sharding has been removed" not in stderr
    assert str(model) not in stderr and not (tmp_path / "out").exists()  # the config came first
