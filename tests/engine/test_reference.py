"""The engine against the executable spec, subzero_ds/reference.py, step by step.

The reference is a plain module in one process with whole parameters; the engine shards them
under ZeRO-3 (or not, stage 0), perturbs in place or fuses the ± pass, and writes with the device
kernels. Both must give the same losses and weights, for every registered method the reference
covers (a direction of position only, updated by ZO-SGD), with q queries and weight decay.
"""

from __future__ import annotations

import copy

import pytest
import torch

import subzero_ds
from helpers.configs import zo_config
from helpers.tiny import pattern_batch, tiny_model
from subzero_ds import methods
from subzero_ds.checkpoint.export import iter_full_state
from subzero_ds.config import parse_config
from subzero_ds.methods import registry
from subzero_ds.reference import reference_step

STEPS = 6
# The registered methods the reference covers: their direction depends on position only (fusable) and
# they update with ZO-SGD (no update rule of their own).
COVERED = [name for name in registry.method_names()
           if registry.method(name).fusable and registry.method(name).update_rule is None]


def test_the_reference_covers_subzero_and_mezo():
    assert {"subzero", "mezo"} <= set(COVERED)


@pytest.mark.parametrize("stage,fused", [(3, False), (0, False), (3, True)], ids=["zero3", "zero0", "zero3-fused"])
@pytest.mark.parametrize("method", COVERED)
@pytest.mark.parametrize("queries", [1, 2])
def test_the_engine_follows_the_reference_step(method, queries, stage, fused):
    config = zo_config(method, stage=stage, persistence=0, lr=2e-3, weight_decay=1.0, queries=queries, fused=fused)
    model = tiny_model("llama")
    plain = copy.deepcopy(model).eval()
    engine = subzero_ds.initialize(model=model, config=config)
    settings = parse_config(config)
    spec = methods.build(settings)
    for step in range(STEPS):
        batch = pattern_batch(4, seed=step)
        result = engine.step(batch)
        losses = reference_step(plain, batch, spec, step, settings.lr, settings.eps, settings.weight_decay)
        probes = spec.estimator.probes()
        mean_pos = sum(loss for p, loss in zip(probes, losses) if p.sign > 0) / queries
        mean_neg = sum(loss for p, loss in zip(probes, losses) if p.sign < 0) / queries
        assert result.loss_pos == pytest.approx(mean_pos, rel=1e-5) and result.loss_neg == pytest.approx(mean_neg, rel=1e-5)
        torch.testing.assert_close(torch.tensor(result.projected_grads),
                                   torch.tensor(spec.estimator.projected_grads(losses, settings.eps)), rtol=1e-3, atol=1e-3)
    # The two forwards agree to fp32 rounding (~1e-7 relative: another summation order under ZeRO-3, or over
    # the doubled batch), so g does to ~1e-3 and the weights to lr·Δg·|D| per step (≈ 2e-3·1e-3·4 × 6 steps);
    # a wrong update (sign, decay, direction, query mean) would differ by lr·g·|D| ≈ 1e-2.
    state = dict(iter_full_state(engine.module))
    worst = max((state[name] - p.detach()).abs().max().item() for name, p in plain.named_parameters())
    assert worst <= 5e-5, worst

