"""SubZeroEngine on one rank: exact restore, stage 0 ≡ stage 3, learning, export, failure modes."""

import argparse
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import subzero_ds
from subzero_ds.config import ConfigError
from helpers.configs import zo_section
from helpers.tiny import pattern_batch, tiny_model
from subzero_ds.checkpoint.export import iter_full_state


def make_config(stage=3, method="subzero", lr=1e-3, bf16=False, persistence=100_000, **subzero):
    config = {
        "zero_optimization": {"stage": stage},
        "subzero": zo_section(**{"method": method, "lr": lr, "eps": 1e-3, "rank": 4, "subspace_interval": 5, "seed": 1, **subzero}),
    }
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = persistence
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def full_state(engine) -> dict[str, torch.Tensor]:
    return dict(iter_full_state(engine.module))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["subzero", "mezo"])
@pytest.mark.parametrize("stage,persistence", [(3, 100_000), (3, 0), (0, 0)], ids=["zero3-persistent", "zero3-partitioned", "zero0"])
def test_step_with_zero_lr_restores_every_parameter_bit_for_bit(dtype, method, stage, persistence):
    engine = subzero_ds.initialize(
        model=tiny_model("llama"), config=make_config(stage, method, lr=0.0, bf16=dtype == "bf16", persistence=persistence)
    )
    before = full_state(engine)
    for _ in range(3):
        result = engine.step(pattern_batch(4))
        assert result.loss_pos != result.loss_neg  # the perturbation really reached the forward pass
    after = full_state(engine)
    assert before.keys() == after.keys()
    assert any(t.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32) for t in after.values())
    for name in before:
        assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("method", ["subzero", "mezo"])
def test_stage0_and_stage3_follow_the_same_trajectory(method):
    runs = {}
    for stage, persistence in [(0, 0), (3, 0), (3, 100_000)]:
        engine = subzero_ds.initialize(model=tiny_model("opt"), config=make_config(stage, method, persistence=persistence))
        losses = [engine.step(pattern_batch(8, seed=i)).loss for i in range(20)]
        runs[(stage, persistence)] = losses, full_state(engine)
    (ref_losses, ref_state), *others = runs.values()
    for losses, state in others:
        assert losses == pytest.approx(ref_losses, rel=1e-6)
        for name, tensor in ref_state.items():
            assert (state[name] - tensor).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("method,lr", [("subzero", 3e-3), ("mezo", 3e-3)])
def test_loss_falls_on_a_synthetic_task(method, lr):
    engine = subzero_ds.initialize(model=tiny_model("opt"), config=make_config(3, method, lr=lr, rank=8, subspace_interval=50))
    batch = pattern_batch(16)
    before = engine.evaluate(batch)
    for _ in range(150):
        engine.step(batch)
    after = engine.evaluate(batch)
    assert after < before - 0.08, (before, after)


def test_step_result_reports_the_two_point_estimate():
    engine = subzero_ds.initialize(model=tiny_model("opt"), config=make_config(lr=1e-4))
    result = engine.step(pattern_batch(4))
    assert result.step == 0 and result.lr == 1e-4 and not result.skipped
    assert result.projected_grad == pytest.approx((result.loss_pos - result.loss_neg) / 2e-3)
    assert result.loss == pytest.approx((result.loss_pos + result.loss_neg) / 2)
    assert engine.step(pattern_batch(4)).step == 1


def test_evaluate_matches_the_model_loss_and_changes_nothing():
    model = tiny_model("opt")
    batch = pattern_batch(4)
    with torch.no_grad():
        expected = model.eval()(**batch).loss.item()
    engine = subzero_ds.initialize(model=model, config=make_config())
    before = full_state(engine)
    assert engine.evaluate(batch) == pytest.approx(expected, rel=1e-6)
    assert all(torch.equal(before[k], v) for k, v in full_state(engine).items())


def test_non_finite_loss_skips_the_update_and_keeps_weights():
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = model(**batch).loss
        return loss * math.nan if len(calls) == 2 else loss

    engine = subzero_ds.initialize(model=tiny_model("opt"), config=make_config(lr=1e-2), loss_fn=loss_fn)
    before = full_state(engine)
    result = engine.step(pattern_batch(4))
    assert result.skipped and math.isnan(result.loss_neg)
    assert all(torch.equal(before[k], v) for k, v in full_state(engine).items())
    assert not engine.step(pattern_batch(4)).skipped  # the next step trains again


def test_custom_loss_fn_replaces_the_model_loss():
    def first_token_loss(model, batch):
        logits = model(input_ids=batch["input_ids"]).logits
        return torch.nn.functional.cross_entropy(logits[:, 0], batch["input_ids"][:, 1])

    engine = subzero_ds.initialize(model=tiny_model("opt"), config=make_config(), loss_fn=first_token_loss)
    batch = pattern_batch(4)
    default = subzero_ds.initialize(model=tiny_model("opt"), config=make_config())
    assert engine.evaluate(batch) != pytest.approx(default.evaluate(batch))


def test_only_trainable_parameters_change():
    model = tiny_model("opt")
    for name, param in model.named_parameters():
        param.requires_grad = "layers.1." in name
    engine = subzero_ds.initialize(model=model, config=make_config(lr=1e-2))
    before = full_state(engine)
    engine.step(pattern_batch(4))
    after = full_state(engine)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("layers.1." in k for k in changed)
    assert engine.method.direction.reshape  # frozen parameters: "auto" reshape is on (PEFT-like)


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_save_pretrained_round_trips_through_from_pretrained(tmp_path, arch):
    engine = subzero_ds.initialize(model=tiny_model(arch), config=make_config(lr=1e-2))
    batch = pattern_batch(4)
    for _ in range(3):
        engine.step(batch)
    engine.save_pretrained(tmp_path / "final")
    assert not (tmp_path / ".final.partial").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    state = full_state(engine)
    for name, tensor in loaded.state_dict().items():
        if name in state:
            assert torch.equal(tensor, state[name]), name
    with torch.no_grad():
        assert loaded(**batch).loss.item() == pytest.approx(engine.evaluate(batch), rel=1e-5)


def test_initialize_accepts_a_deepspeed_args_namespace(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 3}, "subzero": {"method": "mezo", "seed": 4}}')
    engine = subzero_ds.initialize(model=tiny_model("opt"), args=argparse.Namespace(deepspeed_config=str(path)))
    assert engine.config.seed == 4 and engine.config.method == "mezo"


def test_user_errors_are_explained():
    with pytest.raises(ConfigError, match="no DeepSpeed config"):
        subzero_ds.initialize(model=tiny_model("opt"))
    frozen = tiny_model("opt").requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        subzero_ds.initialize(model=frozen, config=make_config())
    engine = subzero_ds.initialize(model=tiny_model("opt"), config=make_config())
    with pytest.raises(ValueError, match="include `labels`"):
        engine.step({"input_ids": pattern_batch(2)["input_ids"]})


def test_persistent_parameters_stay_gathered_and_are_edited_in_place():
    """Small ZeRO-3 parameters stay gathered between forwards: the optimizer edits those copies
    too, instead of releasing them (which costs one all-gather per parameter per forward)."""
    engine = subzero_ds.initialize(model=tiny_model("opt"), config=make_config(lr=1e-2, persistence=100_000))
    released = []
    cache = engine.ds_engine.optimizer
    original = cache.empty_partition_cache
    cache.empty_partition_cache = lambda: (released.append(engine.global_step), original())
    for _ in range(4):
        engine.step(pattern_batch(4))
    assert not released
    assert all(s.gathered() is not None for s in engine.shards)
    for shard in engine.shards:  # the gathered copy equals the (edited) shard
        torch.testing.assert_close(shard.gathered()[shard.start : shard.end], shard.local(), atol=0, rtol=0)
