"""The training entry point under the real launchers, and its errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from launch import run

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun"])
def test_cli_trains_on_two_ranks_and_saves_loadable_weights(tmp_path, launcher):
    finished = run(launcher, 2, "-m", "subzero_ds.train", "--model_name_or_path", "tiny-llama",
                   "--max_steps", "40", "--eval_steps", "20", "--output_dir", str(tmp_path))
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "2 rank(s), global batch 16" in finished.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [20, 40]
    assert all(row["projected_grad"] == pytest.approx((row["loss_pos"] - row["loss_neg"]) / 2e-3) for row in rows)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert model.config.model_type == "llama"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}, "subzero": {"lr": -1, "eps": 0}}))
    finished = run("python", 1, "-m", "subzero_ds.train", "--deepspeed_config", str(config), "--max_steps", "2")
    assert finished.returncode == 2
    assert "Traceback" not in finished.stderr
    for fragment in [str(config), "`subzero.lr`", "`subzero.eps`", "`zero_optimization.stage` is 1"]:
        assert fragment in finished.stderr, fragment


def test_cli_reports_a_missing_config_file(tmp_path):
    finished = run("python", 1, "-m", "subzero_ds.train", "--deepspeed_config", str(tmp_path / "missing.json"))
    assert finished.returncode == 2 and "does not exist" in finished.stderr and "Traceback" not in finished.stderr
