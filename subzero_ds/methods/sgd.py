"""ZO-SGD (MeZO's and SubZero's update): θ ← θ − η·((1/q)·Σ_j g_j·D_{t,j} + λθ). No state."""

from __future__ import annotations

from .base import Direction, UpdateRule, decay_factor
from .registry import NoOptions, UpdateSpec, register_update


class SGD(UpdateRule):
    """ZO-SGD: one generate-and-apply pass per query, straight into the shard.

    Args:
        direction: the method's direction.
        weight_decay: λ, on matrices only.
    """

    def __init__(self, direction: Direction, weight_decay: float) -> None:
        self.direction, self.weight_decay = direction, weight_decay

    def write_(self, target, out, src, start, update, rounding_key):
        queries = len(update.grads)
        for query, grad in enumerate(update.grads):
            first = query == 0
            self.direction.apply_(out, src if first else out, target.name, target.shape, update.step, start,
                                  beta=decay_factor(target, update.lr, self.weight_decay) if first else 1.0,
                                  alpha=-update.lr * grad / queries, rounding_key=rounding_key, query=query)


register_update(UpdateSpec(name="sgd", options=NoOptions,
                           build=lambda direction, config: SGD(direction, config.weight_decay)))
