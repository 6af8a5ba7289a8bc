"""SubZero (Yu et al. 2024, arXiv 2410.08989): D_t = μ·U·Z_t·Vᵀ in a lazily refreshed random subspace."""

from __future__ import annotations

import math

import torch

from .. import kernels
from ..perturbation import Subspace, draw_core, draw_subspace, near_square_shape
from .base import Direction, LowRank


class SubspaceDirection(Direction):
    """SubZero: D_t = μ·U·Z_t·Vᵀ with U, V redrawn once per window of ``interval`` steps.

    Non-matrix parameters (biases, norm weights) use the Gaussian direction.

    Args:
        seed: the run seed.
        rank: subspace rank r (capped at min(m, n)).
        interval: window length F; the subspace of step t belongs to window t // F.
        reshape: view each matrix as its near-square factor pair before building U, V.
    """

    def __init__(self, seed: int, rank: int, interval: int, reshape: bool) -> None:
        super().__init__(seed)
        self.rank, self.interval, self.reshape = rank, interval, reshape
        self._cache: dict[str, tuple[int, Subspace]] = {}  # name -> (window, subspace)
        # (name, device) -> (step, factors): a step's passes (perturb ±, update) share one μZ·Vᵀ.
        self._factors_of_step: dict[tuple[str, torch.device], tuple[int, LowRank]] = {}

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The m×n the subspace is built for: the matrix itself, or its near-square view."""
        return near_square_shape(*shape) if self.reshape else (shape[0], shape[1])

    def subspace(self, name: str, shape: tuple[int, ...], step: int) -> Subspace:
        """U, V of ``name`` for the window holding ``step`` (drawn once per window on the host, then cached)."""
        window = step // self.interval
        cached = self._cache.get(name)
        if cached is None or cached[0] != window:
            rows, cols = self.matrix_shape(shape)
            rank = min(self.rank, rows, cols)
            key = (self.seed, "subspace", window, name, shape, rows, cols, rank)
            cached = (window, draw_subspace(key, rows, cols, rank))
            self._cache[name] = cached
        return cached[1]

    def apply_(self, out, src, name, shape, step, start, beta, alpha, rounding_key=None):
        if len(shape) != 2:
            return self.apply_gaussian_(out, src, name, shape, step, start, beta, alpha, rounding_key)
        factors = self._factors(name, shape, step, out.device)
        kernels.apply_(out, src, beta=beta, alpha=alpha, offset=start, lowrank=(factors.u, factors.core_vt),
                       rounding_key=rounding_key)

    def has_lowrank(self, shape):
        return len(shape) == 2 and self.matrix_shape(shape) == tuple(shape)  # reshaped: low-rank only in its view

    def lowrank(self, name, shape, step, device="cpu"):
        if not self.has_lowrank(shape):
            return super().lowrank(name, shape, step, device)
        return self._factors(name, shape, step, device)

    def _factors(self, name: str, shape: tuple[int, ...], step: int, device: torch.device | str) -> LowRank:
        """U, μ·Z_step, Vᵀ and μ·Z_step·Vᵀ of ``name`` in its (possibly reshaped) matrix shape, on ``device``."""
        device = torch.device(device)
        cached = self._factors_of_step.get((name, device))
        if cached is not None and cached[0] == step:
            return cached[1]
        u, vt = self.subspace(name, shape, step).on(device)
        rank = u.shape[1]
        core = draw_core((self.seed, "core", step, name, shape), rank, device)
        core.mul_(math.sqrt(math.prod(shape)) / rank)  # μ: E‖D‖² = m·n, as for a full Gaussian
        factors = LowRank(u=u, core=core, vt=vt, core_vt=kernels.lowrank_core(core, vt))
        self._factors_of_step[name, device] = (step, factors)
        return factors
