"""The torch reference of the device kernels: bit-identical to them, and the implementation for
devices without one (fake tensors, a host without a compiler). Plain vectorized torch, a chunk of
elements at a time; the generator itself is in ``philox.py``.
"""

from __future__ import annotations

import math

import torch

from . import philox

CHUNK_ELEMENTS = 1 << 18  # elements per chunk (the generator's int64 temporaries)


def apply_(out: torch.Tensor, src: torch.Tensor, dense: torch.Tensor | None, u: torch.Tensor | None,
                     cvt: torch.Tensor | None, beta: float, alpha: float, key: tuple[int, int], offset: int,
                     rounding_key: tuple[int, int] | None) -> None:
    """``out = round(beta·src + alpha·d)`` as the kernels compute it (bit-identical), a chunk of elements at a time."""
    beta32, alpha32 = _as_fp32(beta), _as_fp32(alpha)
    for lo in range(0, out.numel(), CHUNK_ELEMENTS):
        hi = min(lo + CHUNK_ELEMENTS, out.numel())
        if dense is not None:
            d = dense[lo:hi]
        elif u is not None:
            d = _lowrank(u, cvt, offset + lo, offset + hi)
        else:
            d = philox.normals(offset + lo, offset + hi, key, out.device)
        kept = beta32 * src[lo:hi].to(torch.float32) if beta32 != 0.0 else 0.0  # beta 0: src unread (as the kernels)
        value = kept + alpha32 * d
        if rounding_key is not None and out.dtype == torch.bfloat16:
            bits = philox.rounding_bits(offset + lo, offset + hi, rounding_key, out.device)
            out[lo:hi] = philox.stochastic_round_bf16(value, bits)
        else:
            out[lo:hi] = value.to(out.dtype)


def _lowrank(u: torch.Tensor, cvt: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Elements [start, end) of U·CVᵀ: Σ_k U[row, k]·CVᵀ[k, col] in increasing k, as the kernels sum."""
    elements = torch.arange(start, end, device=u.device)
    rows, cols = elements // cvt.shape[1], elements % cvt.shape[1]
    acc = torch.zeros(end - start, dtype=torch.float32, device=u.device)
    for k in range(u.shape[1]):
        acc = acc + u[:, k].index_select(0, rows) * cvt[k].index_select(0, cols)
    return acc


def lowrank_core_(out: torch.Tensor, core: torch.Tensor, vt: torch.Tensor) -> None:
    """``out = core · vt`` summed in increasing index, as the kernels sum."""
    acc = torch.zeros_like(out)
    for l in range(core.shape[1]):
        acc = acc + core[:, l : l + 1] * vt[l : l + 1]
    out.copy_(acc)


def _as_fp32(value: float) -> float:
    """``value`` rounded to fp32 as the kernels take it (exactly representable afterwards)."""
    return float(torch.tensor(value, dtype=torch.float32)) if math.isfinite(value) else value
