"""HiZOO (Zhao et al., "Second-order fine-tuning without pain for LLMs", ICLR 2025, arXiv 2402.15173).

A diagonal Hessian estimate H (fp32, one per trainable element, sharded like the parameter,
initialized to 1) scales the Gaussian direction, and a third forward at θ itself feeds H.
As the authors' code computes a step (Yanjun-Zhao/HiZOO, ``large_models/trainer.py``,
``zo_Hessian_step_update``):

    ℓ0 = L(θ),  ℓ± = L(θ ± ε·√H ⊙ z),  g = (ℓ+ − ℓ−) / 2ε
    H ← (1 − α)·H + α · |ℓ+ + ℓ− − 2ℓ0| / (2ε²) · z² / H
    θ ← θ − η·(g · √H ⊙ z + λθ)            (√H of the updated H)

Their H acts as the inverse of the paper's Σ (the probe is ε·√H·z). Defaults from the authors'
README run (OPT-13B): lr 1e-6, ε 1e-3, α 1e-8 (``HESSIAN_SMOOTH_TYPE=constant1e-8``). Unlike their
code, λ applies to matrices only, as for every method here.
"""

from __future__ import annotations

import torch
from pydantic import Field

from .. import kernels
from .base import Direction, StateTensor, UpdateRule, WriteRange, decay_factor
from .estimators import Estimator
from .mezo import gaussian_key
from .registry import MethodSpec, Options, register_method

CHUNK_ELEMENTS = 1 << 22  # z and √H·z are made a chunk at a time


class HiZOOOptions(Options):
    """HiZOO's keys in the ``"subzero"`` section."""

    hessian_smooth: float = Field(
        1e-8, ge=0.0, le=1.0, allow_inf_nan=False,
        description="HiZOO's Hessian smoothing α in [0, 1] (the authors' OPT-13B setting: 1e-8).")


class HessianDirection(Direction):
    """√H ⊙ z with z the MeZO direction and H this rank's diagonal Hessian estimate (initialized to 1)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.hessian: dict[str, tuple[WriteRange, torch.Tensor]] = {}

    def allocate_(self, ranges: list[WriteRange]) -> None:
        """H = 1 over each parameter's write range."""
        self.hessian = {t.name: (t, t.zeros().fill_(1.0)) for t in ranges}

    def gaussian(self, name: str, shape: tuple[int, ...], step: int, start: int, size: int,
                 device: torch.device) -> torch.Tensor:
        """z over [start, start + size): the MeZO direction's values."""
        return kernels.gaussian(size, gaussian_key(self.seed, step, name, shape), start, device)

    def hessian_slice(self, name: str, start: int, size: int) -> torch.Tensor:
        owner, hessian = self.hessian[name]
        return hessian.narrow(0, start - owner.start, size)

    def apply_(self, out, src, name, shape, step, start, beta, alpha, rounding_key=None, query=0):
        for lo in range(0, out.numel(), CHUNK_ELEMENTS):
            size = min(CHUNK_ELEMENTS, out.numel() - lo)
            direction = self.gaussian(name, shape, step, start + lo, size, out.device)
            direction.mul_(self.hessian_slice(name, start + lo, size).sqrt())
            kernels.apply_(out.narrow(0, lo, size), src.narrow(0, lo, size), beta=beta, alpha=alpha, dense=direction,
                           offset=start + lo, rounding_key=rounding_key)

    def state(self) -> list[StateTensor]:
        return [StateTensor(f"{name}::hessian", h, owner.shape, owner.start) for name, (owner, h) in self.hessian.items()]


class HessianUpdate(UpdateRule):
    """HiZOO's update: H from the three losses, then ZO-SGD along √H ⊙ z (one pass per chunk).

    Args:
        direction: the :class:`HessianDirection` whose H it updates.
        weight_decay: λ (matrices only).
        smooth: α, the Hessian smoothing.
    """

    def __init__(self, direction: HessianDirection, weight_decay: float, smooth: float) -> None:
        self.direction, self.weight_decay, self.smooth = direction, weight_decay, smooth

    def write_(self, target, out, src, start, update, rounding_key):
        clean, plus, minus = update.losses
        curvature = abs(plus + minus - 2 * clean) / (2 * update.eps**2)
        (grad,) = update.grads
        for lo in range(0, out.numel(), CHUNK_ELEMENTS):
            size = min(CHUNK_ELEMENTS, out.numel() - lo)
            z = self.direction.gaussian(target.name, target.shape, update.step, start + lo, size, out.device)
            hessian = self.direction.hessian_slice(target.name, start + lo, size)
            estimate = z.square().div_(hessian).mul_(curvature)  # |ℓ+ + ℓ− − 2ℓ0| / 2ε² · z² / H
            hessian.mul_(1 - self.smooth).add_(estimate, alpha=self.smooth)
            direction = z.mul_(hessian.sqrt())
            kernels.apply_(out.narrow(0, lo, size), src.narrow(0, lo, size), beta=decay_factor(target, update.lr, self.weight_decay),
                           alpha=-update.lr * grad, dense=direction, offset=start + lo, rounding_key=rounding_key)


register_method(MethodSpec(
    name="hizoo",
    title="HiZOO",
    summary="Gaussian preconditioned by a diagonal Hessian estimate; probes ℓ0, ℓ+, ℓ− (HiZOO)",
    options=HiZOOOptions,
    direction=lambda options, seed, frozen_parameters: HessianDirection(seed),
    estimator=lambda queries: Estimator(queries=1, clean=True),
    updates=("sgd",),
    update_rule=lambda direction, config: HessianUpdate(direction, config.weight_decay, config.options.hessian_smooth),
    fusable=False,  # its direction reads H, which the fused pass's side paths do not see
    multi_query=False,
    state_bytes_per_element=4,
    state_name="Hessian H",
    working_chunk_bytes=CHUNK_ELEMENTS * 4 * 2,
))
