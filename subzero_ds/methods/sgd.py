"""ZO-SGD (MeZO's and SubZero's update): θ ← θ − η·((1/q)·Σ_j g_j·D_{t,j} + λθ). No state."""

from __future__ import annotations

from .base import UpdateRule


class SGD(UpdateRule):
    """ZO-SGD: one generate-and-apply pass per query, straight into the shard."""

    def write_(self, target, out, src, start, update, rounding_key):
        for query, grad in enumerate(update.grads):
            first = query == 0
            self.direction.apply_(out, src if first else out, target.name, target.shape, update.step, start,
                                  beta=self.decay(target, update.lr) if first else 1.0,
                                  alpha=-update.lr * grad / self.queries, rounding_key=rounding_key, query=query)
