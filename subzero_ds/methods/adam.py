"""ZO-Adam: Adam's moments of the ZO estimate ĝ = (1/q)·Σ_j g_j·D_{t,j}.

m ← β1·m + (1 − β1)·ĝ, v ← β2·v + (1 − β2)·ĝ², θ ← θ − η(m̂ / (√v̂ + ε_A) + λθ) with the usual
bias corrections. MeZO-style full directions keep m and v parameter-sized (fp32, sharded: 8 bytes
per trainable element per rank's share), ĝ generated a chunk at a time. SubZero keeps a matrix's
m, v in subspace coordinates (r×r, :class:`~subzero_ds.methods.subzero.SubspaceState`), on the
projected step (1/q)Σ g_j Z_j, and writes μ·U·(m̂ / (√v̂ + ε_A))·Vᵀ: Adam's normalization acts on
the subspace coordinates, not on the matrix elements.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..config import StateOnRefresh
from .base import Direction, UpdateRule
from .momentum import Momentum

CHUNK_ELEMENTS = 1 << 22  # ĝ and the step are made a chunk at a time: 16 MiB fp32 of scratch each


class Adam(Momentum):
    """ZO-Adam.

    Args:
        direction, weight_decay, queries: as for every update rule.
        betas: (β1, β2).
        eps: Adam's ε.
        on_refresh: SubZero's subspace state at a window change (reset or project).
    """

    kinds = ("m", "v")

    def __init__(self, direction: Direction, weight_decay: float, queries: int, betas: tuple[float, float],
                 eps: float, on_refresh: StateOnRefresh = StateOnRefresh.RESET) -> None:
        UpdateRule.__init__(self, direction, weight_decay, queries)
        self.betas, self.eps, self.on_refresh = betas, eps, on_refresh
        self.full, self.subspace = {}, {}
        self.updates = 0  # of the parameter-sized states (bias correction)

    def write_(self, target, out, src, start, update, rounding_key):
        decay = self.decay(target, update.lr)
        if target.name in self.subspace:
            state = self.subspace[target.name]
            state.enter_window_(update.step)
            state.updates += 1
            step = self._adam_step(state.tensors["m"], state.tensors["v"], self.projected_coordinates(state, update),
                                   state.updates)
            self.direction.apply_coordinates_(out, src, target.name, target.shape, update.step, start, step,
                                              beta=decay, alpha=-update.lr, rounding_key=rounding_key)
            return
        owner, tensors = self.full[target.name]
        count = self.updates + 1  # self.updates advances once per step, in begin_
        scratch = torch.empty(min(CHUNK_ELEMENTS, out.numel()), dtype=torch.float32, device=out.device)
        for lo in range(0, out.numel(), CHUNK_ELEMENTS):
            size = min(CHUNK_ELEMENTS, out.numel() - lo)
            estimate = self.mean_direction_(scratch.narrow(0, 0, size), target, start + lo, update)
            at = start + lo - owner.start
            step = self._adam_step(tensors["m"].narrow(0, at, size), tensors["v"].narrow(0, at, size), estimate, count)
            kernels.apply_(out.narrow(0, lo, size), src.narrow(0, lo, size), beta=decay, alpha=-update.lr, dense=step,
                           offset=start + lo, rounding_key=rounding_key)

    def end_(self) -> None:
        self.updates += 1

    def _adam_step(self, m: torch.Tensor, v: torch.Tensor, estimate: torch.Tensor, count: int) -> torch.Tensor:
        """Update m, v in place with ``estimate``; return m̂ / (√v̂ + ε) (in ``estimate``'s memory)."""
        beta1, beta2 = self.betas
        m.mul_(beta1).add_(estimate, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(estimate, estimate, value=1 - beta2)
        corrected_v = torch.div(v, 1 - beta2**count, out=estimate).sqrt_().add_(self.eps)
        return torch.div(m, corrected_v, out=corrected_v).div_(1 - beta1**count)

    def scalars(self):
        return {**super().scalars(), "updates": self.updates}

    def load_scalars_(self, values):
        super().load_scalars_(values)
        self.updates = int(values.get("updates", 0))
