"""Pure, seeded generators of ZO directions, computable slice by slice.

Everything here is a function of its arguments only: a direction's value at flat element i of a
parameter depends on (run seed, step, parameter name, full shape, i, method settings), never on
the world size, rank or ZeRO partitioning. To make any slice cheap and bit-identical however the
parameter is cut, directions are produced in fixed chunks aligned to a global grid:

- Gaussian (MeZO): blocks of ``GAUSSIAN_BLOCK`` elements, each from its own seeded generator;
- low-rank (SubZero): blocks of ``LOWRANK_ROWS`` rows, each one matmul of identical shape.

A slice [start, end) is the concatenation of the overlapping chunks, cut to the range.
All directions are fp32; private ``torch.Generator`` objects only, never the global RNG.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch

GAUSSIAN_BLOCK = 1 << 16
LOWRANK_ROWS = 64

Shape = tuple[int, ...]
Chunk = tuple[int, torch.Tensor]  # (first flat index it covers, fp32 values)


def stable_seed(*fields: object) -> int:
    """A 63-bit seed that is a pure hash of ``fields`` (same value in every process and run)."""
    digest = hashlib.blake2b(repr(fields).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(*fields: object) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(stable_seed(*fields))


def gaussian_chunks(key: tuple, numel: int, start: int, end: int) -> Iterator[Chunk]:
    """N(0, 1) values of the flat range [start, end) of a ``numel``-element direction.

    Args:
        key: fields identifying the direction (seed, step, name, shape ...).
        numel: number of elements of the whole direction.
        start, end: the flat range wanted, 0 <= start <= end <= numel.

    Yields:
        ``(first_index, values)`` pieces that tile [start, end) in order.
    """
    for block in range(start // GAUSSIAN_BLOCK, math.ceil(end / GAUSSIAN_BLOCK)):
        block_start = block * GAUSSIAN_BLOCK
        block_size = min(GAUSSIAN_BLOCK, numel - block_start)
        values = torch.randn(block_size, generator=_generator(*key, block), dtype=torch.float32)
        lo, hi = max(start, block_start), min(end, block_start + block_size)
        yield lo, values[lo - block_start : hi - block_start]


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


def orthonormal_basis(key: tuple, rows: int, rank: int) -> torch.Tensor:
    """The Q factor (rows×rank, orthonormal columns) of the reduced QR of a seeded Gaussian matrix."""
    gaussian = torch.randn(rows, rank, generator=_generator(*key), dtype=torch.float32)
    q, _ = torch.linalg.qr(gaussian, mode="reduced")
    return q.contiguous()


@dataclass(frozen=True)
class Subspace:
    """The lazily refreshed bases of one matrix: ``u`` (m×r) and ``v`` (n×r), orthonormal columns."""

    u: torch.Tensor
    v: torch.Tensor


def draw_subspace(key: tuple, rows: int, cols: int, rank: int) -> Subspace:
    """Draw U, V for a rows×cols matrix; ``key`` must include the window index t // F."""
    return Subspace(u=orthonormal_basis((*key, "U"), rows, rank), v=orthonormal_basis((*key, "V"), cols, rank))


def draw_core(key: tuple, rank: int) -> torch.Tensor:
    """The per-step r×r core Z_t with N(0, 1) entries."""
    return torch.randn(rank, rank, generator=_generator(*key, "Z"), dtype=torch.float32)


def lowrank_chunks(
    subspace: Subspace, core: torch.Tensor, scale: float, start: int, end: int
) -> Iterator[Chunk]:
    """Values of the flat range [start, end) of ``scale · U Z Vᵀ`` (row-major), never the whole matrix.

    Rows are computed in blocks of ``LOWRANK_ROWS`` aligned to multiples of it, so an element's
    value does not depend on which slice asked for it (bit-identical across partitionings).
    """
    rows, cols = subspace.u.shape[0], subspace.v.shape[0]
    if start >= end:
        return
    core_vt = (scale * core) @ subspace.v.T  # r×n, shared by every row block
    first_row, last_row = start // cols, (end - 1) // cols
    for block in range(first_row // LOWRANK_ROWS, last_row // LOWRANK_ROWS + 1):
        row0 = block * LOWRANK_ROWS
        row1 = min(row0 + LOWRANK_ROWS, rows)
        values = (subspace.u[row0:row1] @ core_vt).view(-1)
        lo, hi = max(start, row0 * cols), min(end, row1 * cols)
        yield lo, values[lo - row0 * cols : hi - row0 * cols]


def collect(chunks: Iterator[Chunk], start: int, end: int) -> torch.Tensor:
    """Concatenate chunks that tile [start, end) into one fp32 tensor."""
    out = torch.empty(end - start, dtype=torch.float32)
    for lo, values in chunks:
        out[lo - start : lo - start + values.numel()] = values
    return out
