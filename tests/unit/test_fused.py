"""The fused ± pass on one rank: PEFT modes, unknown module types, bf16, and the loss-function contract."""

import pytest
import torch
from torch import nn
from transformers import OPTForCausalLM

import subzero_ds
from subzero_ds.adapters import Tuning, add_adapter
from subzero_ds.demo import pattern_batch, tiny_config, tiny_model
from subzero_ds.export import iter_full_state
from subzero_ds.fused import FusedPassError


# lr 1e-4: fused and in-place ℓ± differ by fp32 rounding (|Δg| ~ 5e-4 at ε = 1e-3), which moves the weights
# by lr·|Δg|·|d| per step; a wrong direction would move them by lr·|g|·|d| ~ 1e-4, far above the 1e-5 bound.
def make_config(fused: bool, method: str = "subzero", lr: float = 1e-4, eps: float = 1e-3, bf16: bool = False,
                persistence: int = 0) -> dict:
    config = {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": persistence},
        "subzero": {"method": method, "lr": lr, "eps": eps, "rank": 4, "subspace_interval": 5, "seed": 2,
                    "fused": fused},
    }
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def run(model_factory, config: dict, steps: int = 6, loss_fn=None):
    engine = subzero_ds.initialize(model=model_factory(), config=config, loss_fn=loss_fn)
    results = [engine.step(pattern_batch(4, seed=i)) for i in range(steps)]
    return results, dict(iter_full_state(engine.module))


def assert_same_run(reference, other, atol=1e-5):
    (ref_results, ref_state), (results, state) = reference, other
    torch.testing.assert_close(torch.tensor([(r.loss_pos, r.loss_neg) for r in results]),
                               torch.tensor([(r.loss_pos, r.loss_neg) for r in ref_results]), rtol=1e-5, atol=1e-6)
    worst = max((state[k] - ref_state[k]).abs().max().item() for k in ref_state)
    assert worst <= atol


@pytest.mark.parametrize("tuning", [Tuning.PREFIX, Tuning.PROMPT, Tuning.LORA])
def test_peft_modes_follow_the_in_place_trajectory(tuning):
    factory = lambda: add_adapter(tiny_model("llama"), tuning)  # noqa: E731
    lr, eps = (1e-2, 1e-2) if tuning is Tuning.LORA else (1e-1, 1e-1)
    reference = run(factory, make_config(False, lr=lr, eps=eps))
    fused = run(factory, make_config(True, lr=lr, eps=eps))
    assert fused[0][0].loss_pos != fused[0][0].loss_neg  # the perturbation reached the forward
    assert_same_run(reference, fused)


class Scale(nn.Module):
    """A module type the fused pass does not know, with its own parameter and a Linear inside."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.inner = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.gain)


def opt_with_unknown_module() -> OPTForCausalLM:
    model = tiny_model("opt")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model.model.decoder.layers[0].fc2 = nn.Sequential(model.model.decoder.layers[0].fc2, Scale(64))
    return model


@pytest.mark.parametrize("method", ["subzero", "mezo"])
def test_unknown_module_types_are_materialized_per_layer_with_the_same_result(method):
    reference = run(opt_with_unknown_module, make_config(False, method))
    fused = run(opt_with_unknown_module, make_config(True, method))
    assert_same_run(reference, fused)


def test_the_fallback_is_reported_in_one_log_line(caplog):
    with caplog.at_level("INFO"):
        subzero_ds.initialize(model=opt_with_unknown_module(), config=make_config(True))
    lines = [r.getMessage() for r in caplog.records if "materialized per gathered layer" in r.getMessage()]
    assert len(lines) == 1 and "1×Scale" in lines[0] and "×LayerNorm" in lines[0]


def test_bf16_fused_with_zero_lr_leaves_every_weight_bit_identical():
    engine = subzero_ds.initialize(model=tiny_model("llama"), config=make_config(True, lr=0.0, bf16=True))
    before = dict(iter_full_state(engine.module))
    for i in range(3):
        result = engine.step(pattern_batch(4, seed=i))
        assert result.loss_pos != result.loss_neg
    after = dict(iter_full_state(engine.module))
    assert any(t.dtype == torch.bfloat16 for t in after.values())
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bf16_fused_losses_match_the_in_place_ones():
    in_place = run(lambda: tiny_model("llama"), make_config(False, bf16=True, eps=1e-2), steps=3)[0]
    fused = run(lambda: tiny_model("llama"), make_config(True, bf16=True, eps=1e-2), steps=3)[0]
    for a, b in zip(in_place, fused):  # bf16 in place rounds θ ± εD to 8 bits; the side path adds εD in fp32
        assert b.loss_pos == pytest.approx(a.loss_pos, abs=3e-2) and b.loss_neg == pytest.approx(a.loss_neg, abs=3e-2)


def test_a_custom_loss_function_gets_its_own_half_of_each_call():
    def loss_fn(model, batch):  # two model calls per loss, logits used directly
        first = model(input_ids=batch["input_ids"]).logits
        second = model(input_ids=batch["input_ids"].flip(1)).logits
        assert first.shape[0] == batch["input_ids"].shape[0]
        return first.float().logsumexp(-1).mean() - second.float().mean()

    reference = run(lambda: tiny_model("opt"), make_config(False), loss_fn=loss_fn, steps=3)
    fused = run(lambda: tiny_model("opt"), make_config(True), loss_fn=loss_fn, steps=3)
    assert_same_run(reference, fused)


def test_a_loss_function_that_calls_the_model_differently_each_time_is_refused():
    calls = iter(range(100))

    def flaky(model, batch):
        for _ in range(1 + next(calls) % 2):
            loss = model(**batch).loss
        return loss

    engine = subzero_ds.initialize(model=tiny_model("opt"), config=make_config(True), loss_fn=flaky)
    with pytest.raises(FusedPassError, match='"fused": false'):
        engine.step(pattern_batch(4))


def test_a_layer_input_without_the_doubled_batch_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 3)

        def forward(self, input_ids, labels=None):
            return {"loss": self.proj(torch.ones(3, 3)).sum()}  # 3 rows: not [B; B]

    engine = subzero_ds.initialize(model=Odd(), config=make_config(True, method="mezo"),
                                   loss_fn=lambda model, batch: model(**batch)["loss"])
    with pytest.raises(FusedPassError, match="doubled"):
        engine.step({"input_ids": torch.zeros(2, 4, dtype=torch.long)})


def test_fused_mode_keeps_no_backup_of_the_shards():
    engine = subzero_ds.initialize(model=tiny_model("opt"), config=make_config(True))
    assert not engine.optimizer.in_place
    assert all(backup is None for backup in engine.optimizer._backups)


def test_the_lm_head_is_computed_and_scored_a_chunk_of_rows_at_a_time(monkeypatch):
    from subzero_ds import loss
    from subzero_ds.demo import VOCAB

    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 5 * VOCAB)
    rows_scored = []
    cross_entropy = torch.nn.functional.cross_entropy

    def recording(logits, *args, **kwargs):
        rows_scored.append(logits.shape[0])
        return cross_entropy(logits, *args, **kwargs)

    reference, _ = run(lambda: tiny_model("opt"), make_config(fused=False), steps=1)
    monkeypatch.setattr(loss.F, "cross_entropy", recording)
    results, _ = run(lambda: tiny_model("opt"), make_config(fused=True), steps=1)
    assert rows_scored == ([5] * 12 + [4]) * 2  # 4 × 16 rows per half: the doubled logits never exist whole
    torch.testing.assert_close([results[0].loss_pos, results[0].loss_neg],
                               [reference[0].loss_pos, reference[0].loss_neg], rtol=1e-6, atol=1e-6)
