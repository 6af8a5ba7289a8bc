"""ZO-Adam: Adam's moments of the ZO estimate ĝ = (1/q)·Σ_j g_j·D_{t,j}.

m ← β1·m + (1 − β1)·ĝ, v ← β2·v + (1 − β2)·ĝ², θ ← θ − η(m̂ / (√v̂ + ε_A) + λθ) with the usual
bias corrections. Full directions (MeZO, its variants) keep m and v parameter-sized (fp32, sharded:
8 bytes per trainable element per rank's share), ĝ generated a chunk at a time. SubZero keeps a
matrix's m, v in subspace coordinates (r×r), on the projected step (1/q)Σ g_j Z_j, and writes
μ·U·(m̂ / (√v̂ + ε_A))·Vᵀ: Adam's normalization acts on the subspace coordinates, not on the matrix
elements.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from .. import kernels
from .base import Direction, StateTensor, UpdateRule, WriteRange, decay_factor, mean_direction_
from .moments import Moments
from .registry import Options, UpdateSpec, register_update

CHUNK_ELEMENTS = 1 << 22  # ĝ and the step are made a chunk at a time: 16 MiB fp32 of scratch each


class AdamOptions(Options):
    """The keys of ``"update": "adam"``."""

    betas: list[Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)]] = Field(
        [0.9, 0.999], min_length=2, max_length=2, description='β1, β2 of "update": "adam", two numbers in [0, 1).')
    adam_eps: float = Field(1e-8, gt=0.0, allow_inf_nan=False, description="Adam's ε, a number > 0.")


class Adam(UpdateRule):
    """ZO-Adam.

    Args:
        direction: the method's direction.
        weight_decay: λ, on matrices only.
        betas: (β1, β2).
        eps: Adam's ε.
    """

    def __init__(self, direction: Direction, weight_decay: float, betas: tuple[float, float], eps: float) -> None:
        self.direction, self.weight_decay, self.betas, self.eps = direction, weight_decay, betas, eps
        self.moments = Moments(direction, ("m", "v"))
        self.updates = 0  # of the parameter-sized states (bias correction)

    def allocate_(self, ranges: list[WriteRange]) -> None:
        self.moments.allocate_(ranges)

    def write_(self, target, out, src, start, update, rounding_key):
        decay = decay_factor(target, update.lr, self.weight_decay)
        if target.name in self.moments.coordinates:
            state = self.moments.coordinates[target.name]

            def advance() -> torch.Tensor:
                state.enter_window_(update.step)
                state.updates += 1
                estimate = self.moments.projected_coordinates(target.name, update.grads, update.step)
                return self._adam_step(state.tensors["m"], state.tensors["v"], estimate, state.updates)

            step = self.moments.once_per_step(target.name, update.step, advance)
            self.direction.apply_coordinates_(out, src, target.name, target.shape, update.step, start, step,
                                              beta=decay, alpha=-update.lr, rounding_key=rounding_key)
            return
        count = self.updates + 1  # self.updates advances once per step, in end_
        scratch = torch.empty(min(CHUNK_ELEMENTS, out.numel()), dtype=torch.float32, device=out.device)
        for lo in range(0, out.numel(), CHUNK_ELEMENTS):
            size = min(CHUNK_ELEMENTS, out.numel() - lo)
            estimate = mean_direction_(self.direction, scratch.narrow(0, 0, size), target, start + lo, update)
            moments = self.moments.slices(target, start + lo, size)
            step = self._adam_step(moments["m"], moments["v"], estimate, count)
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

    def state(self) -> list[StateTensor]:
        return self.moments.state()

    def copies(self) -> list[StateTensor]:
        return self.moments.copies()

    def scalars(self):
        return {**self.moments.scalars(), "updates": self.updates}

    def load_scalars_(self, values):
        self.moments.load_scalars_(values)
        self.updates = int(values.get("updates", 0))


register_update(UpdateSpec(
    name="adam", options=AdamOptions, state_bytes_per_element=8, state_name="Adam m, v",
    working_chunk_bytes=CHUNK_ELEMENTS * 4 * 2,
    build=lambda direction, config: Adam(direction, config.weight_decay, tuple(config.update_options.betas),
                                         config.update_options.adam_eps),
))
