"""ZO-SGD with momentum: M ← βM + ĝ, θ ← θ − η(M + λθ), ĝ = (1/q)·Σ_j g_j·D_{t,j}.

Full directions (MeZO, its variants) keep M parameter-sized (fp32, sharded like the parameter: 4
bytes per trainable element per rank's share). SubZero keeps a matrix's M in its subspace
coordinates, r×r: ĝ = μ·U·((1/q)Σ g_j Z_j)·Vᵀ, so M = μ·U·M_c·Vᵀ with M_c ← βM_c + (1/q)Σ g_j Z_j,
and the step writes μ·U·M_c·Vᵀ; biases and norms keep full M.
"""

from __future__ import annotations

import torch
from pydantic import Field

from .. import kernels
from .base import Direction, StateTensor, UpdateRule, WriteRange, decay_factor, mean_direction_
from .moments import Moments
from .registry import Options, UpdateSpec, register_update


class MomentumOptions(Options):
    """The keys of ``"update": "momentum"``."""

    momentum: float = Field(0.9, ge=0.0, lt=1.0, allow_inf_nan=False,
                            description='β of "update": "momentum", a number in [0, 1).')


class Momentum(UpdateRule):
    """ZO momentum.

    Args:
        direction: the method's direction.
        weight_decay: λ, on matrices only.
        beta: the momentum β.
    """

    def __init__(self, direction: Direction, weight_decay: float, beta: float) -> None:
        self.direction, self.weight_decay, self.beta = direction, weight_decay, beta
        self.moments = Moments(direction, ("momentum",))

    def allocate_(self, ranges: list[WriteRange]) -> None:
        self.moments.allocate_(ranges)

    def write_(self, target, out, src, start, update, rounding_key):
        decay = decay_factor(target, update.lr, self.weight_decay)
        if target.name in self.moments.coordinates:
            state = self.moments.coordinates[target.name]

            def advance() -> torch.Tensor:
                state.enter_window_(update.step)
                moment = state.tensors["momentum"]
                return moment.mul_(self.beta).add_(
                    self.moments.projected_coordinates(target.name, update.grads, update.step))

            moment = self.moments.once_per_step(target.name, update.step, advance)
            self.direction.apply_coordinates_(out, src, target.name, target.shape, update.step, start, moment,
                                              beta=decay, alpha=-update.lr, rounding_key=rounding_key)
            return
        moment = self.moments.slices(target, start, out.numel())["momentum"]
        mean_direction_(self.direction, moment, target, start, update, beta=self.beta)
        kernels.apply_(out, src, beta=decay, alpha=-update.lr, dense=moment, offset=start, rounding_key=rounding_key)

    def state(self) -> list[StateTensor]:
        return self.moments.state()

    def copies(self) -> list[StateTensor]:
        return self.moments.copies()

    def scalars(self):
        return self.moments.scalars()

    def load_scalars_(self, values):
        self.moments.load_scalars_(values)


register_update(UpdateSpec(
    name="momentum", options=MomentumOptions, state_bytes_per_element=4, state_name="momentum",
    build=lambda direction, config: Momentum(direction, config.weight_decay, config.update_options.momentum),
))
