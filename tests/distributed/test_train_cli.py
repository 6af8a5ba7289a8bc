"""The training entry point end to end: tiny OPT/LLaMA/RoBERTa, 1 and 2 ranks, real launchers."""

import glob
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from launch import run
from subzero_ds.demo import save_tiny_pretrained

pytestmark = pytest.mark.distributed

POSITIVE = ["a great and moving film", "wonderful acting and a fine story", "the best movie this year", "great fun"]
NEGATIVE = ["a dull and boring mess", "terrible acting and a bad story", "the worst movie this year", "bad and slow"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rows = [(t, 1) for t in POSITIVE] + [(t, 0) for t in NEGATIVE]
    for name, copies in [("train.tsv", 4), ("dev.tsv", 1)]:
        (root / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows * copies))
    squad = [{"title": "Films", "context": f"The film was {w}. It ran for two hours.", "question": "How was the film?",
              "answers": {"text": [w], "answer_start": [13]}} for w in ["great", "bad", "long", "fine"]]
    (root / "squad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in squad * 4))
    texts = POSITIVE + NEGATIVE + ["It was great terrible", "Title: Context: Question: Answer:"] * 5
    for arch in ("opt", "llama", "roberta"):
        save_tiny_pretrained(root / arch, arch, texts)
    return root


def train_command(workspace, arch, output, *extra):
    return ("-m", "subzero_ds.train", "--model_name_or_path", str(workspace / arch), "--task", "sst2",
            "--train_file", str(workspace / "train.tsv"), "--validation_file", str(workspace / "dev.tsv"),
            "--max_steps", "12", "--log_steps", "4", "--eval_steps", "6", "--per_device_batch_size", "2",
            "--max_length", "48", "--output_dir", str(output), *extra)


def read_metrics(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def assert_complete_outputs(output):
    rows = read_metrics(output)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [4, 8, 12]
    for r in train_rows:
        assert r["projected_grad"] == pytest.approx((r["loss_pos"] - r["loss_neg"]) / 2e-3, rel=1e-6)
        assert r["tokens_per_second"] > 0 and r["seconds_per_step"] > 0
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 6, 12]
    results = json.loads((output / "eval_results.json").read_text())
    assert 0 <= results["final"]["accuracy"] <= 1 and results["num_eval"] == 8
    AutoTokenizer.from_pretrained(output / "final")
    return results


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_one_and_two_ranks_train_the_same_model(workspace, tmp_path, arch):
    """--train_as_classification averages over examples, so 1 rank × 4 ≡ 2 ranks × 2 (deepspeed launcher)."""
    one, two = tmp_path / "one", tmp_path / "two"
    finished = run("python", 1, *train_command(workspace, arch, one, "--train_as_classification",
                                                 "--per_device_batch_size", "4"))
    assert finished.returncode == 0, finished.stderr[-3000:]
    finished = run("deepspeed", 2, *train_command(workspace, arch, two, "--train_as_classification"))
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    assert "zero-shot accuracy" in finished.stdout and "final accuracy" in finished.stdout
    results = [assert_complete_outputs(out) for out in (one, two)]
    assert results[0]["final"] == results[1]["final"] and results[1]["world_size"] == 2
    weights = [load_file(out / "final" / "model.safetensors") for out in (one, two)]
    initial = AutoModelForCausalLM.from_pretrained(workspace / arch).state_dict()
    assert max((weights[0][k] - initial[k]).abs().max().item() for k in weights[0]) > 1e-4  # it trained
    for name, tensor in weights[0].items():
        assert (weights[1][name] - tensor).abs().max().item() <= 1e-5, name
    loaded = AutoModelForCausalLM.from_pretrained(two / "final")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights[1].items())


def test_mpirun_trains_opt_with_the_lm_loss(workspace, tmp_path):
    finished = run("mpirun", 2, *train_command(workspace, "opt", tmp_path))
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    assert_complete_outputs(tmp_path)


def test_masked_lm_trains_as_classification_and_feeds_deepspeed_monitors(workspace, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
        "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "run"},
        "subzero": {"lr": 1e-4, "eps": 1e-3, "rank": 4}}))
    finished = run("python", 1, *train_command(workspace, "roberta", tmp_path / "out", "--deepspeed_config", str(config)))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_complete_outputs(tmp_path / "out")
    loss_csv = next((tmp_path / "csv").rglob("*loss.csv"))
    assert len(loss_csv.read_text().splitlines()) >= 3


def test_squad_is_evaluated_with_generation_f1(workspace, tmp_path):
    finished = run("python", 1, "-m", "subzero_ds.train", "--model_name_or_path", str(workspace / "llama"),
                   "--task", "squad", "--train_file", str(workspace / "squad.jsonl"),
                   "--validation_file", str(workspace / "squad.jsonl"), "--num_eval", "4", "--max_steps", "3",
                   "--log_steps", "1", "--max_new_tokens", "4", "--output_dir", str(tmp_path))
    assert finished.returncode == 0, finished.stderr[-3000:]
    final = json.loads((tmp_path / "eval_results.json").read_text())["final"]
    assert set(final) == {"f1", "exact_match"} and 0 <= final["exact_match"] <= final["f1"] <= 1


@pytest.mark.parametrize("change,fragment", [
    (("--task", "nosuchtask"), "nosuchtask"),
    (("--train_file", "/no/such/file.tsv"), "/no/such/file.tsv"),
    (("--model_name_or_path", "/no/such/model"), "/no/such/model"),
])
def test_bad_arguments_give_a_clear_error(workspace, tmp_path, change, fragment):
    command = list(train_command(workspace, "llama", tmp_path))
    flag = command.index(change[0])
    command[flag + 1] = change[1]
    finished = run("python", 1, *command)
    assert finished.returncode == 2, finished.stderr[-2000:]
    assert fragment in finished.stderr and "Traceback" not in finished.stderr


def test_a_bad_data_row_is_reported_with_file_row_and_field(workspace, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood film\t1\nbad film\tmaybe\n")
    command = list(train_command(workspace, "llama", tmp_path))
    command[command.index("--train_file") + 1] = str(bad)
    finished = run("python", 1, *command)
    assert finished.returncode == 2 and "Traceback" not in finished.stderr
    for fragment in [str(bad), "maybe", "label"]:
        assert fragment in finished.stderr, (fragment, finished.stderr[-1500:])


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


def test_lora_on_two_ranks_saves_a_peft_adapter_and_a_merged_model(workspace, tmp_path):
    from peft import PeftModel

    finished = run("deepspeed", 2, *train_command(workspace, "llama", tmp_path, "--tuning", "lora",
                                                    "--merge_adapter", "--train_as_classification"))
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    assert_complete_outputs(tmp_path)
    final = tmp_path / "final"
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "llama"), final).eval()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    ids = AutoTokenizer.from_pretrained(final / "merged")("a great and moving film", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(workspace / "llama").eval()
        assert not torch.allclose(base(ids).logits, adapted(ids).logits, atol=1e-6)  # the adapter trained


def test_prompt_tuning_scores_candidates_after_the_virtual_tokens(workspace, tmp_path):
    finished = run("python", 1, *train_command(workspace, "opt", tmp_path, "--tuning", "prompt",
                                                 "--train_as_classification"))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_complete_outputs(tmp_path)
    assert (tmp_path / "final" / "adapter_config.json").exists()


def test_launched_ranks_leave_no_shared_memory_behind(workspace, tmp_path):
    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    finished = run("deepspeed", 2, *train_command(workspace, "opt", tmp_path, "--max_steps", "2"))
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) <= before
