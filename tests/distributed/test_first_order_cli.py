"""The CLI's first-order baselines (DeepSpeed's optimizer) and its gradient accumulation for ZO runs."""

import json

import pytest
from launch import run
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers.tiny import save_tiny_pretrained

pytestmark = pytest.mark.distributed
TEXTS = ["a great and moving film", "a dull and boring mess", "the best movie this year", "the worst movie this year",
         "wonderful acting", "terrible acting", "great fun", "bad and slow"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_order")
    rows = "".join(f"{t}\t{int(i % 2 == 0)}\n" for i, t in enumerate(TEXTS * 4))
    (root / "train.tsv").write_text("sentence\tlabel\n" + rows)
    save_tiny_pretrained(root / "llama", "llama", TEXTS * 5 + ["It was great terrible"] * 5)
    return root


def command(workspace, output, *extra):
    return ("-m", "subzero_ds.train", "--model_name_or_path", str(workspace / "llama"), "--task", "sst2",
            "--train_file", str(workspace / "train.tsv"), "--validation_file", str(workspace / "train.tsv"),
            "--max_steps", "8", "--log_steps", "4", "--eval_steps", "4", "--max_length", "32",
            "--train_as_classification", "--output_dir", str(output), *extra)


def rows(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_adamw_baseline_trains_on_two_ranks_with_the_same_outputs(workspace, tmp_path):
    done = run("deepspeed", 2, *command(workspace, tmp_path, "--optimizer", "adamw", "--learning_rate", "1e-3",
                                        "--per_device_batch_size", "2"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    metrics = rows(tmp_path)
    train = [r for r in metrics if "loss" in r]
    assert [r["step"] for r in train] == [4, 8] and all(r["lr"] == 1e-3 for r in train)
    assert [r["step"] for r in metrics if "eval_accuracy" in r] == [0, 4, 8]
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["optimizer"] == "first-order (adamw)" and results["world_size"] == 2
    trained = load_file(tmp_path / "final" / "model.safetensors")
    initial = AutoModelForCausalLM.from_pretrained(workspace / "llama").state_dict()
    assert max((trained[k] - initial[k]).abs().max().item() for k in trained) > 1e-4  # AdamW moved the weights
    AutoModelForCausalLM.from_pretrained(tmp_path / "final")


def test_zo_gradient_accumulation_through_the_cli_equals_a_bigger_micro_batch(workspace, tmp_path):
    config = tmp_path / "accumulate.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                                  "zero_optimization": {"stage": 3},
                                  "subzero": {"lr": 1e-3, "eps": 1e-3, "rank": 4}}))
    accumulated = run("python", 1, *command(workspace, tmp_path / "accumulated", "--deepspeed_config", str(config)))
    assert accumulated.returncode == 0, accumulated.stderr[-3000:]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3},
                                 "subzero": {"lr": 1e-3, "eps": 1e-3, "rank": 4}}))
    bigger = run("python", 1, *command(workspace, tmp_path / "bigger", "--deepspeed_config", str(plain)))
    assert bigger.returncode == 0, bigger.stderr[-3000:]
    a, b = ([r for r in rows(tmp_path / name) if "loss" in r] for name in ("accumulated", "bigger"))
    for x, y in zip(a, b):  # the classification loss is a mean over examples: 2 × 2 ≡ 4
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    weights = [load_file(tmp_path / name / "final" / "model.safetensors") for name in ("accumulated", "bigger")]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) <= 1e-5


def test_first_order_refuses_zo_checkpoint_flags(workspace, tmp_path):
    done = run("python", 1, *command(workspace, tmp_path, "--optimizer", "sgd", "--save_steps", "2"))
    assert done.returncode == 2 and "--save_steps" in done.stderr and "Traceback" not in done.stderr
