"""ZO-SGD (MeZO's and SubZero's update): θ ← θ − η·((1/q)·Σ_j g_j·D_{t,j} + λθ). No state."""

from __future__ import annotations

from .base import Direction, UpdateRule, decay_factor
from .registry import NoOptions, UpdateSpec, register_update


class SGD(UpdateRule):
    """ZO-SGD: the mean of the queries' g_j·D_j written straight into the shard (SubZero: one pass, a pass per
    query for Gaussian directions).

    Args:
        direction: the method's direction.
        weight_decay: λ, on matrices only.
    """

    def __init__(self, direction: Direction, weight_decay: float) -> None:
        self.direction, self.weight_decay = direction, weight_decay

    def write_(self, target, out, src, start, update, rounding_key):
        self.direction.apply_mean_(out, src, target.name, target.shape, update.step, start, update.grads,
                                   beta=decay_factor(target, update.lr, self.weight_decay), alpha=-update.lr,
                                   rounding_key=rounding_key)


register_update(UpdateSpec(name="sgd", options=NoOptions,
                           build=lambda direction, config: SGD(direction, config.weight_decay)))
