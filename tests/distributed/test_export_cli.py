"""The checkpoint CLI end to end: --save_total_limit, half-precision training, and subzero-export with
--base_model and --merge (tiny LLaMA, a few steps).

Half precision is fp16 where DeepSpeed's accelerator supports it (GPUs, CPUs with AVX-512 FP16) and
bf16 elsewhere; DeepSpeed refuses fp16 on a CPU without it."""

import json
import shutil
import subprocess

import pytest
import torch
from deepspeed.accelerator import get_accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from launch import BIN, REPO, run
from subzero_ds.checkpoint.cli import main as export_main
from helpers.tiny import save_tiny_pretrained

pytestmark = pytest.mark.distributed
ROWS = [("a great and moving film", 1), ("wonderful acting", 1), ("a dull mess", 0), ("terrible acting", 0)]
STEPS = 4
HALF = "fp16" if get_accelerator().is_fp16_supported() else "bf16"
HALF_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}[HALF]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    (root / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in ROWS * 4))
    texts = [t for t, _ in ROWS] + ["It was great terrible"] * 5
    for name in ("base-full", "base-lora"):
        save_tiny_pretrained(root / name, "llama", texts)
    return root


def train_command(workspace, base, output, config, *extra):
    (workspace / f"{output.name}.json").write_text(json.dumps(config))
    return ("-m", "subzero_ds.train", "--model_name_or_path", str(workspace / base), "--task", "sst2",
            "--train_file", str(workspace / "train.tsv"), "--validation_file", str(workspace / "train.tsv"),
            "--num_eval", "4", "--train_as_classification", "--max_steps", str(STEPS), "--log_steps", "1",
            "--per_device_batch_size", "2", "--max_length", "32", "--output_dir", str(output),
            "--deepspeed_config", str(workspace / f"{output.name}.json"), *extra)


@pytest.fixture(scope="module")
def half_run(workspace):
    """Full fine-tuning in half precision on 2 ranks, a checkpoint every step, the newest 2 kept; then its base model moves."""
    output = workspace / HALF
    config = {"train_micro_batch_size_per_gpu": 2, HALF: {"enabled": True}, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "subzero": {"lr": 1e-3, "eps": 1e-2, "rank": 4, "seed": 1}}
    finished = run("ranks", 2, *train_command(workspace, "base-full", output, config, "--save_steps", "1",
                                                    "--save_total_limit", "2"))
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    shutil.copytree(workspace / "base-full", workspace / "base-moved")
    shutil.rmtree(workspace / "base-full")  # the path the checkpoints recorded no longer exists
    return output


@pytest.fixture(scope="module")
def lora_run(workspace):
    output = workspace / "lora"
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "subzero": {"lr": 1e-2, "eps": 1e-2, "rank": 4, "seed": 1}}
    finished = run("python", 1, *train_command(workspace, "base-lora", output, config, "--tuning", "lora",
                                                 "--save_steps", str(STEPS)))
    assert finished.returncode == 0, finished.stderr[-3000:]
    return output


def test_save_total_limit_keeps_the_newest_checkpoints(half_run):
    kept = sorted(p.name for p in (half_run / "checkpoints").iterdir())
    assert kept == [f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}"]  # no older one, no partial directory
    manifest = json.loads((half_run / "checkpoints" / f"checkpoint-{STEPS}" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and len(manifest["files"]) == 2


def test_half_precision_trains_end_to_end(half_run, workspace):
    rows = [json.loads(line) for line in (half_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, STEPS + 1)) and not any(r["skipped"] for r in losses)
    assert all(r["loss_pos"] != r["loss_neg"] for r in losses)
    final = load_file(half_run / "final" / "model.safetensors")
    assert {t.dtype for t in final.values()} == {HALF_DTYPE}
    base = AutoModelForCausalLM.from_pretrained(workspace / "base-moved").state_dict()
    assert max((final[k].float() - base[k]).abs().max().item() for k in final) > 1e-3  # it trained, in half precision
    assert AutoModelForCausalLM.from_pretrained(half_run / "final").dtype == HALF_DTYPE


def test_export_needs_base_model_once_the_recorded_one_is_gone(half_run, workspace, tmp_path):
    checkpoint = half_run / "checkpoints" / f"checkpoint-{STEPS}"
    finished = subprocess.run([str(BIN / "subzero-export"), str(checkpoint), str(tmp_path / "hf")], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2 and "Traceback" not in finished.stderr, finished.stderr[-2000:]
    for fragment in ("subzero-export: error:", str(workspace / "base-full"), "no longer exists", "--base_model"):
        assert fragment in finished.stderr, (fragment, finished.stderr[-2000:])
    assert not (tmp_path / "hf").exists()

    export_main([str(half_run / "checkpoints"), str(tmp_path / "hf"), "--base_model", str(workspace / "base-moved")])
    exported, final = load_file(tmp_path / "hf" / "model.safetensors"), load_file(half_run / "final" / "model.safetensors")
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)  # the newest checkpoint is the final model


def test_export_merge_writes_a_plain_model_with_the_adapter_merged_in(lora_run, workspace, tmp_path):
    from peft import PeftModel

    export_main([str(lora_run / "checkpoints"), str(tmp_path / "merged"), "--merge"])
    merged_dir = tmp_path / "merged"
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(workspace / "base-lora").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "base-lora"),
                                        lora_run / "final").eval()
    assert merged.state_dict().keys() == base.state_dict().keys()
    ids = AutoTokenizer.from_pretrained(workspace / "base-lora")("a great and moving film", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, adapted(**ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(**ids).logits, base(**ids).logits, atol=1e-6)  # the adapter trained
