"""MeZO (Malladi et al. 2023, arXiv 2305.17333): every element of D_t an independent N(0, 1).

Its Gaussian direction is also what SubZero uses for parameters that are not matrices, what HiZOO
preconditions and what S-MeZO masks: they all draw it through :func:`gaussian_key`, so the same
(seed, step, parameter, query) gives the same z in each of them.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..seeds import key_of, query_fields
from .base import Direction, RoundingKey
from .registry import MethodSpec, NoOptions, register_method


def gaussian_key(seed: int, step: int, name: str, shape: tuple[int, ...], query: int = 0) -> tuple[int, int]:
    """The generator key of parameter ``name``'s N(0, 1) direction at (step, query)."""
    return key_of(seed, "gaussian", step, name, shape, *query_fields(query))


def apply_gaussian_(out: torch.Tensor, src: torch.Tensor, seed: int, name: str, shape: tuple[int, ...], step: int,
                    start: int, beta: float, alpha: float, rounding_key: RoundingKey = None, query: int = 0) -> None:
    """``out = round(beta·src + alpha·z[start : start + len(out)])`` with z the Gaussian direction of ``name``."""
    key = gaussian_key(seed, step, name, shape, query)
    kernels.apply_(out, src, beta=beta, alpha=alpha, key=key, offset=start, rounding_key=rounding_key)


class GaussianDirection(Direction):
    """MeZO: every element an independent N(0, 1)."""

    def apply_(self, out, src, name, shape, step, start, beta, alpha, rounding_key=None, query=0):
        apply_gaussian_(out, src, self.seed, name, shape, step, start, beta, alpha, rounding_key, query)


register_method(MethodSpec(
    name="mezo",
    title="MeZO",
    summary="i.i.d. N(0, 1) in every element (MeZO)",
    options=NoOptions,
    direction=lambda options, seed, frozen_parameters: GaussianDirection(seed),
))
