"""Estimators: which probes a ZO step takes, and how their losses become projected gradients.

A probe is the model at θ + sign·ε·D_{t,j} (sign ±1, query j) or at θ itself (sign 0). With q
queries the two-point estimator takes 2q probes and gives g_j = (ℓ+_j − ℓ−_j) / 2ε for each
(ZO-Bench's q-RGE: the update is the mean of g_j·D_j); HiZOO's adds the clean ℓ0 first. With
gradient accumulation every probe's loss is averaged over the step's micro-batches first, so a
step over k micro-batches of b rows estimates what one micro-batch of k·b rows would.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    """One forward pass of a step: the model at θ + sign·ε·D_{t,query} (sign 0: θ itself)."""

    query: int
    sign: float


@dataclass(frozen=True)
class Estimator:
    """The probes of a step and the projected gradients they give.

    Attributes:
        queries: q, independent directions per step.
        clean: also probe θ itself (HiZOO's ℓ0, for its curvature estimate).
    """

    queries: int = 1
    clean: bool = False

    def probes(self) -> list[Probe]:
        """Every probe of a step, in the order they run: ℓ0 (if clean), then ℓ+_j, ℓ−_j for each query."""
        pairs = [Probe(j, sign) for j in range(self.queries) for sign in (1.0, -1.0)]
        return [Probe(0, 0.0), *pairs] if self.clean else pairs

    def projected_grads(self, losses: list[float], eps: float) -> list[float]:
        """g_j = (ℓ+_j − ℓ−_j) / 2ε for each query, from losses in :meth:`probes` order."""
        pairs = losses[1:] if self.clean else losses
        return [(pairs[2 * j] - pairs[2 * j + 1]) / (2 * eps) for j in range(self.queries)]
