"""The fused ± pass on one rank: PEFT modes, unknown module types, bf16, and the loss-function contract."""

import math

import pytest
import torch
from torch import nn
from transformers import OPTForCausalLM

import subzero_ds
from subzero_ds.adapters import Tuning, add_adapter
from helpers.configs import zo_section
from subzero_ds.probes import FusedProbes, InPlaceProbes
from helpers.tiny import pattern_batch, tiny_model
from subzero_ds.checkpoint.export import iter_full_state
from subzero_ds import fused as fused_module
from subzero_ds.fused import FusedPassError


# lr 1e-4: fused and in-place ℓ± differ by fp32 rounding (|Δg| ~ 5e-4 at ε = 1e-3), which moves the weights
# by lr·|Δg|·|d| per step; a wrong direction would move them by lr·|g|·|d| ~ 1e-4, far above the 1e-5 bound.
def make_config(fused: bool, method: str = "subzero", lr: float = 1e-4, eps: float = 1e-3, bf16: bool = False,
                persistence: int = 0) -> dict:
    config = {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": persistence},
        "subzero": zo_section(**{"method": method, "lr": lr, "eps": eps, "rank": 4, "subspace_interval": 5, "seed": 2,
                    "fused": fused}),
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


BF16_EPS = 1e-2
BF16_UNIT_ROUNDOFF = 2.0 ** -8  # round to nearest with 8 significant bits: |error| <= 2^-8 |x|


def bf16_run(fused: bool, steps: int = 3):
    engine = subzero_ds.initialize(model=tiny_model("llama"), config=make_config(fused, bf16=True, eps=BF16_EPS))
    return engine, [engine.step(pattern_batch(4, seed=i)) for i in range(steps)]


def bf16_pass_noise(direction, step: int) -> float:
    """Standard deviation of the bf16 rounding error of one ℓ± pass on step ``step``'s batch (tiny LLaMA).

    Every bf16 value a pass produces (the in-place mode's weights θ ± εD, every module's output) is
    rounded to nearest: an error within ±2^-8 of its size, modelled as independent and uniform, of
    standard deviation 2^-8/√3 · |x|. To first order it moves the loss by (∂L/∂x) · error, so the
    pass's loss has an error of std 2^-8/√3 · ‖(∂L/∂x) ⊙ x‖₂ over all those values x: autograd on an
    fp32 copy of the bf16 model at θ, with |θ| + ε|D| for |θ ± εD|. Each module's output counts
    (a Linear inside an attention block and the block's output are both counted): an overestimate.
    """
    model = tiny_model("llama").to(torch.bfloat16).float().eval()
    outputs = {}

    def keep(module, args, output):
        tensor = output[0] if isinstance(output, tuple) else getattr(output, "logits", output)
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            tensor.retain_grad()
            outputs[id(tensor)] = tensor

    hooks = [m.register_forward_hook(keep) for m in model.modules()]
    model(**pattern_batch(4, seed=step)).loss.backward()
    for hook in hooks:
        hook.remove()
    squares = sum(((p.grad * (p.detach().abs() + BF16_EPS * direction.full(n, tuple(p.shape), step).abs())) ** 2).sum()
                  for n, p in model.named_parameters())
    squares = squares + sum(((y.grad * y.detach()) ** 2).sum() for y in outputs.values() if y.grad is not None)
    return BF16_UNIT_ROUNDOFF / math.sqrt(3) * math.sqrt(squares.item())


@pytest.fixture(scope="module")
def bf16_in_place():
    """The in-place bf16 run and, per step, the bound on |Δ(ℓ+ − ℓ−)| between the two modes."""
    engine, results = bf16_run(False)
    # Δ(ℓ+ − ℓ−) between the modes holds four passes' rounding errors (ℓ+, ℓ− of each): std 2σ; allow 6 std.
    bounds = [6 * 2 * bf16_pass_noise(engine.method.direction, r.step) for r in results]
    return results, bounds


def assert_same_differences(in_place, fused, bounds):
    for a, b, bound in zip(in_place, fused, bounds):
        assert abs((b.loss_pos - b.loss_neg) - (a.loss_pos - a.loss_neg)) <= bound, (a, b, bound)
        assert abs(b.projected_grad - a.projected_grad) <= bound / (2 * BF16_EPS), (a, b, bound)


def test_bf16_fused_losses_match_the_in_place_ones(bf16_in_place):
    """ℓ+ − ℓ− and g agree within bf16 rounding: measured |Δ| ~1.5e-4 against bounds ~2e-3.

    Each bound is below |ℓ+ − ℓ−| itself (9e-3 … 4e-2), so halves swapped (ℓ+ − ℓ− → about −(ℓ+ − ℓ−))
    cannot pass.
    """
    in_place, bounds = bf16_in_place
    _, fused = bf16_run(True)
    assert all(bound < abs(r.loss_pos - r.loss_neg) for r, bound in zip(in_place, bounds)), bounds
    assert_same_differences(in_place, fused, bounds)
    for a, b in zip(in_place, fused):
        assert b.loss_pos == pytest.approx(a.loss_pos, abs=3e-2) and b.loss_neg == pytest.approx(a.loss_neg, abs=3e-2)


def test_swapped_halves_fail_the_bf16_comparison(bf16_in_place, monkeypatch):
    """The comparison above can fail: with the side path's ± halves swapped, it does."""
    in_place, bounds = bf16_in_place
    half_signs = fused_module.batches.half_signs
    monkeypatch.setattr(fused_module.side_paths, "half_signs", lambda *args, **kwargs: -half_signs(*args, **kwargs))
    _, swapped = bf16_run(True)
    with pytest.raises(AssertionError):
        assert_same_differences(in_place, swapped, bounds)


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
    assert isinstance(engine.probes, FusedProbes) and engine.probes.theta is None
    in_place = subzero_ds.initialize(model=tiny_model("opt"), config=make_config(False))
    assert isinstance(in_place.probes, InPlaceProbes) and len(in_place.probes.theta.local) == len(in_place.shards)


def test_the_lm_head_is_computed_and_scored_a_chunk_of_rows_at_a_time(monkeypatch):
    from subzero_ds import loss
    from helpers.tiny import VOCAB

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
