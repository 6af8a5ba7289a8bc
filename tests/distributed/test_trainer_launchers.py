"""ZOTrainer on 1 and 2 ranks (deepspeed, torchrun, accelerate launch) against our engine driven by hand."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from launch import BIN, run

pytestmark = pytest.mark.distributed
SCRIPT = "tests/distributed/launching/trainer_equivalence.py"


# 2 ranks with accumulation 2 is the case where the Trainer's and the engine's micro-batch counting could part.
@pytest.mark.parametrize("launcher,ranks,accumulation", [("python", 1, 1), ("deepspeed", 2, 2)])
def test_zotrainer_matches_the_engine_driven_by_hand(tmp_path, launcher, ranks, accumulation):
    done = run(launcher, ranks, SCRIPT, "--out", str(tmp_path / "r.pt"), "--workdir", str(tmp_path),
               "--accumulation", str(accumulation), timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = torch.load(tmp_path / "r.pt", weights_only=False)
    assert result["world_size"] == ranks and result["micro_batches"] == 6 * accumulation
    trainer, hand = result["trainer"], result["hand"]
    assert max((trainer[k] - hand[k]).abs().max().item() for k in hand) <= 1e-6
    losses = [row for row in result["log_history"] if "loss" in row]
    assert [row["step"] for row in losses] == [2, 4, 6] and all(row["loss"] > 0 for row in losses)


EXAMPLE = "examples/trainer_superglue.py"


@pytest.fixture(scope="module")
def superglue(tmp_path_factory):
    from helpers.tiny import save_tiny_pretrained

    root = tmp_path_factory.mktemp("superglue")
    pairs = [("good", "good"), ("bad", "good"), ("long", "long"), ("fine", "bad")] * 4
    rows = [{"premise": f"The film was {w}.", "hypothesis": f"It was {h}.", "idx": i,
             "label": "entailment" if w == h else "not_entailment"} for i, (w, h) in enumerate(pairs)]
    for name in ("train.jsonl", "val.jsonl"):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["premise"] + " " + r["hypothesis"] for r in rows] * 3 + ["Yes No True False entailment"] * 5
    save_tiny_pretrained(root / "llama", "llama", texts)
    (root / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3}, "subzero": {"lr": 1e-3, "eps": 1e-3, "rank": 4}}))
    (root / "accelerate.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
        f"  deepspeed_config_file: {root / 'ds.json'}\n  zero3_init_flag: true\nnum_machines: 1\nnum_processes: 2\n"
        "use_cpu: true\nmachine_rank: 0\nmain_training_function: main\n")
    return root


def launch_example(command, root: Path, output: Path):
    import subprocess

    from launch import RENDEZVOUS_VARIABLES, REPO

    env = {k: v for k, v in __import__("os").environ.items() if k not in RENDEZVOUS_VARIABLES}
    env.update(OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    arguments = ["--model", str(root / "llama"), "--data_dir", str(root), "--output_dir", str(output), "--max_steps", "6"]
    if "accelerate" not in command[0]:
        arguments += ["--deepspeed", str(root / "ds.json")]
    return subprocess.run([*command, EXAMPLE, *arguments], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "accelerate"])
def test_the_example_runs_under_every_launcher_with_the_same_result(superglue, tmp_path, launcher):
    from subzero_ds.distributed import free_port

    commands = {
        "deepspeed": [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())],
        "torchrun": [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())],
        "accelerate": [str(BIN / "accelerate"), "launch", "--config_file", str(superglue / "accelerate.yaml"),
                       "--main_process_port", str(free_port())],
    }
    done = launch_example(commands[launcher], superglue, tmp_path / launcher)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / launcher / "final" / "model.safetensors")
    reference = superglue / "reference.safetensors"  # the first launcher's result; the others must match it
    if not reference.exists():
        shutil.copy(tmp_path / launcher / "final" / "model.safetensors", reference)
    expected = load_file(reference)
    assert max((weights[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6
    assert list((tmp_path / launcher).glob("runs/*/events.out.tfevents.*"))  # report_to tensorboard wrote events
