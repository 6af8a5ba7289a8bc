"""Faults under the real launcher: a rank killed mid-run, then --resume; resuming on another world size."""

import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from launch import REPO, RENDEZVOUS_VARIABLES, launcher_command, run
from helpers.tiny import save_tiny_pretrained

pytestmark = pytest.mark.distributed
STEPS, SAVE_EVERY = 40, 10
ROWS = [("a great and moving film", 1), ("wonderful acting", 1), ("the best movie", 1), ("great fun", 1),
        ("a dull mess", 0), ("terrible acting", 0), ("the worst movie", 0), ("bad and slow", 0)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    (root / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in ROWS * 4))
    (root / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in ROWS))
    save_tiny_pretrained(root / "llama", "llama", [t for t, _ in ROWS] + ["It was great terrible"] * 5)
    return root


def train_args(workspace, output, per_device=2, *extra):
    return ("-m", "subzero_ds.train", "--model_name_or_path", str(workspace / "llama"), "--task", "sst2",
            "--train_file", str(workspace / "train.tsv"), "--validation_file", str(workspace / "dev.tsv"),
            "--train_as_classification", "--max_steps", str(STEPS), "--log_steps", "1", "--save_steps",
            str(SAVE_EVERY), "--per_device_batch_size", str(per_device), "--max_length", "48",
            "--output_dir", str(output), *extra)


def loss_rows(output):
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss_pos"], r["loss_neg"]) for r in rows if "loss_pos" in r]


def final_weights(output):
    return load_file(output / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    output = workspace / "uninterrupted"
    finished = run("deepspeed", 2, *train_args(workspace, output))
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    return output


def test_a_rank_killed_mid_run_then_resume_ends_with_the_uninterrupted_weights(workspace, uninterrupted):
    output = workspace / "killed"
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}
    args = train_args(workspace, output)
    launcher = subprocess.Popen([*launcher_command("deepspeed", 2), "--module", *args[1:]], cwd=REPO,
                                env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        marker = output / "checkpoints" / f"checkpoint-{2 * SAVE_EVERY}" / "manifest.json"
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert launcher.poll() is None, launcher.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "subzero_ds.train" in " ".join(p.cmdline())]
        victim = next(p for p in ranks if "--local_rank=1" in p.cmdline())
        os.kill(victim.pid, signal.SIGKILL)
        returncode = launcher.wait(timeout=120)  # the launcher must stop the whole job, not hang
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert returncode != 0
    assert not (output / "final").exists()  # killed before the end

    finished = run("deepspeed", 2, *train_args(workspace, output, 2, "--resume"))
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    assert f"resumed from {output / 'checkpoints'}" in finished.stdout
    assert loss_rows(output) == loss_rows(uninterrupted)  # bit-identical losses, no duplicated rows
    reference, resumed = final_weights(uninterrupted), final_weights(output)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_a_two_rank_checkpoint_resumes_on_one_rank(workspace, uninterrupted):
    output = workspace / "one-rank"
    checkpoint = uninterrupted / "checkpoints" / f"checkpoint-{STEPS - SAVE_EVERY}"
    finished = run("python", 1, *train_args(workspace, output, 4, "--resume", str(checkpoint)))
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    rows, reference_rows = loss_rows(output), loss_rows(uninterrupted)
    assert [r[0] for r in rows] == list(range(STEPS - SAVE_EVERY + 1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([r[1:] for r in rows]), torch.tensor([r[1:] for r in reference_rows[-SAVE_EVERY:]]),
                               rtol=1e-5, atol=1e-6)
    reference, resumed = final_weights(uninterrupted), final_weights(output)
    assert max((reference[k] - resumed[k]).abs().max().item() for k in reference) <= 1e-5
    # The results count the whole run's training time: the checkpoint's 30 steps plus this run's 10.
    before = json.loads((checkpoint / "manifest.json").read_text())["extra"]["train_seconds"]
    results = json.loads((output / "eval_results.json").read_text())
    assert (results["steps"], results["trained_steps"], results["resumed_at_step"]) == (STEPS, SAVE_EVERY, STEPS - SAVE_EVERY)
    assert before > 0 and results["train_seconds"] > before and "train_seconds_estimated" not in results


def test_resume_with_other_data_is_refused(workspace, uninterrupted):
    output = workspace / "other-data"
    checkpoint = uninterrupted / "checkpoints" / f"checkpoint-{STEPS}"
    finished = run("python", 1, *train_args(workspace, output, 4, "--resume", str(checkpoint), "--seed", "3"))
    assert finished.returncode == 2
    assert "other training data" in finished.stderr and "Traceback" not in finished.stderr


def test_a_checkpoint_exports_offline_to_the_final_model(workspace, uninterrupted, tmp_path):
    from subzero_ds.checkpoint.cli import main as export_main
    from transformers import AutoModelForCausalLM

    export_main([str(uninterrupted / "checkpoints"), str(tmp_path / "hf")])  # the newest: step 40, the final one
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    reference = final_weights(uninterrupted)
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
