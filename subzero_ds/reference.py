"""One ZO-SGD step as a specification: a plain ``nn.Module``, one process, whole parameters.

Everything else in the package (shards, backups, kernels, NVMe swaps, the fused pass, collectives)
exists to compute exactly this, sharded across ranks and devices: the tests run the engine and this
function side by side and compare losses and weights step by step. It covers the methods whose
direction depends on position only and whose update is ZO-SGD (SubZero, MeZO and their like);
momentum, Adam and HiZOO are checked against their own references in the tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .loss import LossFn, forward_loss, model_loss
from .methods import ZOMethod


def reference_step(model: nn.Module, batch: Any, method: ZOMethod, step: int, lr: float, eps: float,
                   weight_decay: float = 0.0, loss_fn: LossFn = model_loss) -> list[float]:
    """Probe, estimate and update ``model``'s trainable parameters in place; return the probes' losses.

    ℓ for each probe θ + sign·ε·D_{step,j} (the estimator's order), g_j = (ℓ+_j − ℓ−_j) / 2ε, then
    θ ← (1 − ηλ)·θ − η·(1/q)·Σ_j g_j·D_{step,j}, with λ on matrices only; arithmetic in fp32, each
    result rounded to the parameter's dtype.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    theta = {name: p.detach().float().clone() for name, p in params.items()}

    def direction(name: str, query: int) -> torch.Tensor:
        p = params[name]
        return method.direction.full(name, tuple(p.shape), step, p.device, query)

    losses = []
    with torch.no_grad():
        for probe in method.estimator.probes():
            for name, p in params.items():
                perturbation = probe.sign * eps * direction(name, probe.query) if probe.sign else 0.0
                p.copy_((theta[name] + perturbation).to(p.dtype))
            losses.append(forward_loss(loss_fn, model, batch))
        grads = method.estimator.projected_grads(losses, eps)
        for name, p in params.items():
            estimate = sum(g * direction(name, j) for j, g in enumerate(grads)) / len(grads)
            decay = weight_decay if p.dim() == 2 else 0.0
            p.copy_((theta[name] * (1 - lr * decay) - lr * estimate).to(p.dtype))
    return losses
