"""Sharded checkpoints on one rank: exact resume, atomicity, keep-last-K, corruption and mismatch errors."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import subzero_ds
from subzero_ds.checkpoint.sharded import CheckpointError, latest_checkpoint, list_checkpoints
from helpers.configs import zo_section
from helpers.tiny import pattern_batch, tiny_model
from subzero_ds.checkpoint.export import iter_full_state


def make_engine(fused=False, bf16=False, **subzero):
    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000},
              "subzero": zo_section(**{"lr": 1e-3, "eps": 1e-3, "rank": 4, "subspace_interval": 3, "seed": 7,
                                       "fused": fused, **subzero})}
    if bf16:
        config["bf16"] = {"enabled": True}
    return subzero_ds.initialize(model=tiny_model("llama"), config=config)


def train(engine, steps):
    return [(r.loss_pos, r.loss_neg) for r in (engine.step(pattern_batch(4, seed=engine.global_step))
                                              for _ in range(steps))]


@pytest.mark.parametrize("fused,bf16", [(False, False), (True, False), (False, True)], ids=["in-place", "fused", "bf16"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, fused, bf16):
    uninterrupted = make_engine(fused, bf16)
    losses = train(uninterrupted, 8)
    reference = dict(iter_full_state(uninterrupted.module))

    first = make_engine(fused, bf16)
    resumed_losses = train(first, 4)
    first.save_checkpoint(tmp_path, extra={"data_step": 4})
    second = make_engine(fused, bf16)  # fresh weights: everything must come from the checkpoint
    assert second.load_checkpoint(tmp_path) == {"data_step": 4}
    assert second.global_step == 4
    resumed_losses += train(second, 4)

    assert resumed_losses == losses  # bit-identical loss rows
    state = dict(iter_full_state(second.module))
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_keep_last_k_and_partial_directories_are_ignored(tmp_path):
    engine = make_engine()
    for _ in range(4):
        train(engine, 1)
        engine.save_checkpoint(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    (tmp_path / ".checkpoint-5.partial").mkdir()  # a crashed save
    (tmp_path / "checkpoint-6").mkdir()  # no manifest: incomplete
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"


def test_a_corrupt_shard_file_is_refused_with_the_file_named(tmp_path):
    engine = make_engine()
    train(engine, 2)
    path = engine.save_checkpoint(tmp_path)
    shard = next(path.glob("rank-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=shard.name):
        make_engine().load_checkpoint(path)


@pytest.mark.parametrize("setting,saved,changed", [
    ("rank", 4, 8), ("method", "subzero", "mezo"), ("seed", 7, 8), ("subspace_interval", 3, 4),
    ("reshape", "auto", "always"),
])
def test_resuming_with_other_direction_settings_is_refused(tmp_path, setting, saved, changed):
    engine = make_engine()
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    resumed = make_engine(**{setting: changed})
    with pytest.raises(CheckpointError) as refused:
        resumed.load_checkpoint(tmp_path)
    message = str(refused.value)
    assert f"subzero.{setting}={saved!r}" in message and f"this run has {changed!r}" in message, message
    assert "would not continue the same trajectory" in message
    assert resumed.global_step == 0  # nothing was loaded


@pytest.mark.parametrize("changed", ["global_batch", "data_seed", "data_fingerprint"])
def test_resuming_with_other_data_or_global_batch_is_refused(tmp_path, changed):
    from subzero_ds.train import resume

    data = {"data_fingerprint": 12345, "data_seed": 0, "global_batch": 4}
    engine = make_engine()
    train(engine, 1)
    path = engine.save_checkpoint(tmp_path, extra={**data, "zero_shot": {"accuracy": 0.5}})
    assert resume(make_engine(), str(path), tmp_path, data)["zero_shot"] == {"accuracy": 0.5}  # the same data resumes
    other = {**data, changed: data[changed] + 4}  # e.g. 2 ranks x 4 instead of 1 rank x 4
    with pytest.raises(CheckpointError, match=f"other training data \\({changed} differ\\)"):
        resume(make_engine(), str(path), tmp_path, other)


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        make_engine().load_checkpoint(tmp_path / "nothing-here")


KILLED_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    import subzero_ds.checkpoint.sharded as checkpoint
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_engine, train
    engine = make_engine()
    train(engine, 2)
    engine.save_checkpoint({root!r})
    train(engine, 2)
    real_write = checkpoint._write_json_durably
    def die_before_the_manifest_lands(file, value):
        with open(file, "w") as f:
            f.write('{{"step": ')  # a torn manifest
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint._write_json_durably = die_before_the_manifest_lands
    engine.save_checkpoint({root!r})
""")


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    root = tmp_path / "ckpt"
    script = KILLED_MID_SAVE.format(tests=os.path.dirname(__file__), root=str(root))
    # Not this process's own 1-rank group: the child makes its own.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              env={**env, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == -9, finished.stderr[-2000:]
    assert (root / ".checkpoint-4.partial").is_dir()  # the torn save is there …
    assert latest_checkpoint(root).name == "checkpoint-2"  # … and ignored
    engine = make_engine()
    engine.load_checkpoint(root)
    assert engine.global_step == 2
    manifest = json.loads((root / "checkpoint-2" / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["state"]["seed"] == 7


def test_a_lora_checkpoint_exports_offline_as_an_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from subzero_ds.adapters import AdapterOptions, Tuning, add_adapter
    from subzero_ds.checkpoint.cli import export_checkpoint

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    options = AdapterOptions()
    model = add_adapter(AutoModelForCausalLM.from_pretrained(base), Tuning.LORA, options)
    config = {"zero_optimization": {"stage": 3}, "subzero": {"lr": 1e-2, "eps": 1e-2, "rank": 4, "seed": 1}}
    engine = subzero_ds.initialize(model=model, config=config)
    train(engine, 3)
    trained = {k: v for k, v in iter_full_state(engine.module) if "lora_" in k}
    extra = {"model_name_or_path": str(base), "tuning": "lora", "adapter": {**options.__dict__}}
    engine.save_checkpoint(tmp_path / "ckpt", extra=extra)

    export_checkpoint(tmp_path / "ckpt", tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    state = dict(loaded.named_parameters())
    assert trained and all(torch.equal(state[k], v) for k, v in trained.items())
