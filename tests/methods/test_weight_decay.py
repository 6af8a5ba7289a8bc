"""weight_decay λ: θ ← θ − η·(g·D + λ·θ) on matrices, θ ← θ − η·g·D on biases and norm weights.

The engine is compared with a dense single-process reference written here: whole tensors, plain
loops, D from ``direction.full`` and g from each StepResult.
"""

import pytest
import torch

import subzero_ds
from helpers.tiny import pattern_batch, tiny_model
from subzero_ds.checkpoint.export import iter_full_state

# Visible decay: lr·λ = 1e-3 of every matrix element per step (~2e-5 for OPT's 0.02 init), 20× the 1e-6 bound.
LR, DECAY = 1e-2, 0.1


def opt_with_nonzero_vectors():
    """Tiny OPT (Linear biases, LayerNorm weights and biases) with every 1-D parameter moved off its 0/1 init,
    so that decay on one of them would change it from the first step on."""
    model = tiny_model("opt")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def make_engine(weight_decay: float, fused: bool = False, persistence: int = 0):
    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": persistence},
              "subzero": {"lr": LR, "eps": 1e-3, "rank": 4, "subspace_interval": 3, "seed": 3,
                          "weight_decay": weight_decay, "fused": fused}}
    return subzero_ds.initialize(model=opt_with_nonzero_vectors(), config=config)


@pytest.mark.parametrize("fused,persistence", [(False, 0), (False, 100_000), (True, 0)],
                         ids=["in-place", "in-place-persistent", "fused"])
def test_updates_match_a_dense_reference(fused, persistence):
    engine = make_engine(DECAY, fused, persistence)
    theta = {name: p.detach().double() for name, p in opt_with_nonzero_vectors().named_parameters()}  # tied once
    assert {s.name for s in engine.shards} == theta.keys()
    assert {p.ndim for p in theta.values()} == {1, 2}
    for step in range(4):
        g = engine.step(pattern_batch(4, seed=step)).projected_grad
        for name, value in theta.items():
            d = engine.method.direction.full(name, tuple(value.shape), step).double()
            if value.ndim == 2:
                theta[name] = value - LR * (g * d + DECAY * value)
            else:
                theta[name] = value - LR * g * d
        state = dict(iter_full_state(engine.module))
        differences = {name: (state[name].double() - value).abs().max().item() for name, value in theta.items()}
        worst = max(differences, key=differences.get)
        assert differences[worst] <= 1e-6, (step, worst, differences[worst])


def test_decay_reaches_matrices_and_never_biases_or_norms():
    # One step from the same weights: g and D are the same with and without decay, so only the decay differs.
    before = dict(opt_with_nonzero_vectors().named_parameters())
    without, with_decay = make_engine(0.0), make_engine(DECAY)
    results = [engine.step(pattern_batch(4)) for engine in (without, with_decay)]
    assert results[0].projected_grad == results[1].projected_grad
    a, b = dict(iter_full_state(without.module)), dict(iter_full_state(with_decay.module))
    kinds = {"bias": [], "norm": [], "matrix": []}
    for name, param in before.items():
        kinds["matrix" if param.ndim == 2 else "norm" if "layer_norm" in name else "bias"].append(name)
    assert all(kinds.values()), kinds
    for name in kinds["bias"] + kinds["norm"]:
        assert torch.equal(a[name], b[name]), name
    for name in kinds["matrix"]:
        # θ_λ − θ_0 = −lr·λ·θ, θ the weights before the step: lr·λ = 1e-3 of every matrix element
        torch.testing.assert_close(b[name] - a[name], -LR * DECAY * before[name].detach(), rtol=1e-3, atol=1e-9)
