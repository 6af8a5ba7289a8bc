"""The three choices a ZO method makes, each behind one small interface.

- :class:`Direction`: what D_t is (Gaussian, random subspace, masked, preconditioned), generated
  for any slice of a parameter as a pure function of (seed, step, query, name, shape, position);
- the estimator (``estimators.py``): which probes a step takes and how their losses become the
  projected gradient(s);
- :class:`UpdateRule` (``sgd.py``, ``momentum.py``, ``adam.py``): how g·D becomes Δθ, and the state
  it keeps, sharded exactly like the parameters (or in SubZero's r×r subspace coordinates).

Each method lives in one file of this package; :func:`subzero_ds.methods.build` assembles them
from the ``"subzero"`` section.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .. import kernels
from ..perturbation import key_of

RoundingKey = tuple[int, int] | None


class Direction(ABC):
    """How a ZO method draws D_t; a pure function of (seed, step, name, shape, position)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    @abstractmethod
    def apply_(self, out: torch.Tensor, src: torch.Tensor, name: str, shape: tuple[int, ...], step: int, start: int,
               beta: float, alpha: float, rounding_key: RoundingKey = None) -> None:
        """``out = round(beta·src + alpha·D_step[start : start + len(out)])`` for parameter ``name``.

        ``out`` and ``src`` are 1-D, of one dtype and device (``out`` may be ``src``); the direction
        is computed on that device, in fp32.
        """

    def apply_gaussian_(self, out: torch.Tensor, src: torch.Tensor, name: str, shape: tuple[int, ...], step: int,
                        start: int, beta: float, alpha: float, rounding_key: RoundingKey = None) -> None:
        """:meth:`apply_` with the i.i.d. N(0, 1) direction of ``name``."""
        key = key_of(self.seed, "gaussian", step, name, shape)
        kernels.apply_(out, src, beta=beta, alpha=alpha, key=key, offset=start, rounding_key=rounding_key)

    def full(self, name: str, shape: tuple[int, ...], step: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The whole fp32 D_step of ``name`` in its own shape, on ``device`` (the values of every slice)."""
        out = torch.empty(math.prod(shape), dtype=torch.float32, device=device)
        self.apply_(out, out, name, shape, step, 0, beta=0.0, alpha=1.0)
        return out.view(shape)

    def has_lowrank(self, shape: tuple[int, ...]) -> bool:
        """Whether :meth:`lowrank` gives factors for a parameter of this shape."""
        return False

    def lowrank(self, name: str, shape: tuple[int, ...], step: int, device: torch.device | str = "cpu") -> LowRank:
        """D_step as factors μ·U·Z·Vᵀ in the parameter's own shape, on ``device`` (only where :meth:`has_lowrank`)."""
        raise ValueError(f"{type(self).__name__} has no low-rank factors for {name} {shape}")


@dataclass(frozen=True)
class LowRank:
    """D = U · core · Vᵀ with ``core`` = μ·Z already scaled (U: m×r, core: r×r, Vᵀ: r×n, fp32, one device).

    ``core_vt`` = core · Vᵀ (r×n), made by the kernels in a fixed order of operations (the same bits
    on every device); D's element (i, j) is U[i] · core_vt[:, j].
    """

    u: torch.Tensor
    core: torch.Tensor
    vt: torch.Tensor
    core_vt: torch.Tensor

    @property
    def v(self) -> torch.Tensor:
        """V (n×r)."""
        return self.vt.T


