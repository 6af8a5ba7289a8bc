"""Pure, seeded pieces of ZO directions: keys, SubZero's subspaces and low-rank slices.

Everything here is a function of its arguments only: a direction's value at flat element i of a
parameter depends on (run seed, step, parameter name, full shape, i, method settings), never on
the world size, rank or ZeRO partitioning.

- Gaussian (MeZO) values come from the counter-based generator of :mod:`subzero_ds.kernels`: a key
  hashed from those fields, the value at i a function of (key, i), the same bits on every device.
- Low-rank (SubZero) values of a flat range are ``U[rows] · (μ Z Vᵀ)`` for the rows the range
  covers, computed element by element by the same kernels in a fixed order (never the whole m×n
  matrix, never a BLAS matmul): the same bits for any slice and on every device. U, V are drawn on
  the host (the same on every rank) and cached on each device that needs them for their window.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch

from . import kernels

Shape = tuple[int, ...]


def stable_seed(*fields: object) -> int:
    """A 63-bit seed that is a pure hash of ``fields`` (same value in every process and run)."""
    digest = hashlib.blake2b(repr(fields).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def key_of(*fields: object) -> tuple[int, int]:
    """The generator key of the direction (or random stream) named by ``fields``."""
    return kernels.direction_key(stable_seed(*fields))


@lru_cache(maxsize=4096)
def near_square_shape(m: int, n: int) -> tuple[int, int]:
    """The factor pair (m', n') of m·n with m' the largest divisor of m·n that is <= sqrt(m·n).

    An 8×5120 LoRA factor becomes 160×256; a 10×2048 prompt 128×160.
    """
    total = m * n
    for rows in range(math.isqrt(total), 0, -1):
        if total % rows == 0:
            return rows, total // rows
    return 1, total  # total == 0


@contextlib.contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """fp32 matmuls at full precision inside (no TF32 on NVIDIA GPUs, whatever the user enabled)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def orthonormal_basis(key: tuple[int, int], rows: int, rank: int) -> torch.Tensor:
    """The Q factor (rows×rank, orthonormal columns, fp32, host) of the reduced QR of a seeded Gaussian.

    Computed on one thread: LAPACK's blocking may depend on the thread count, and every rank (and a
    rerun on another world size) must draw the same basis.
    """
    gaussian = kernels.gaussian(rows * rank, key).view(rows, rank)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, _ = torch.linalg.qr(gaussian, mode="reduced")
    finally:
        torch.set_num_threads(threads)
    return q.contiguous()


@dataclass
class Subspace:
    """The bases of one matrix for one window: ``u`` (m×r) and ``vt`` = Vᵀ (r×n), V with orthonormal columns.

    Drawn on the host; :meth:`on` gives (and keeps) a copy on each device that asks.
    """

    u: torch.Tensor
    vt: torch.Tensor

    def __post_init__(self) -> None:
        self._copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {self.u.device: (self.u, self.vt)}

    @property
    def v(self) -> torch.Tensor:
        """V (n×r)."""
        return self.vt.T

    def on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, Vᵀ) on ``device``, copied there once per window."""
        device = torch.device(device)
        if device not in self._copies:
            self._copies[device] = (self.u.to(device), self.vt.to(device))
        return self._copies[device]


def draw_subspace(key: tuple, rows: int, cols: int, rank: int) -> Subspace:
    """Draw U, V for a rows×cols matrix; ``key`` must include the window index t // F."""
    return Subspace(u=orthonormal_basis(key_of(*key, "U"), rows, rank),
                    vt=orthonormal_basis(key_of(*key, "V"), cols, rank).T.contiguous())


def draw_core(key: tuple, rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The per-step r×r core Z_t with N(0, 1) entries, generated directly on ``device``."""
    return kernels.gaussian(rank * rank, key_of(*key, "Z"), device=device).view(rank, rank)
