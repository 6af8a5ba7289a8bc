"""MeZO (Malladi et al. 2023, arXiv 2305.17333): every element of D_t an independent N(0, 1)."""

from __future__ import annotations

from .base import Direction


class GaussianDirection(Direction):
    """MeZO: every element an independent N(0, 1)."""

    def apply_(self, out, src, name, shape, step, start, beta, alpha, rounding_key=None, query=0):
        self.apply_gaussian_(out, src, name, shape, step, start, beta, alpha, rounding_key, query)
