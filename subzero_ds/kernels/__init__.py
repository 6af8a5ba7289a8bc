"""Device kernels of a ZO pass: counter-based Gaussian directions, generated and applied in one pass.

One operation serves every write the shard writer makes::

    out = round(beta · src + alpha · d)       d: the Gaussian direction (key, offset …), a low-rank
                                              U·(μZVᵀ) at its flat positions, or a dense fp32 tensor

perturb (beta = 1, alpha = ±ε), update (beta = 1 − ηλ, alpha = −ηg) and plain generation (beta = 0).
A low-rank element is Σ_k U[row, k]·CVᵀ[k, col] summed in increasing k, and CVᵀ = μZ·Vᵀ is made by
:func:`lowrank_core` in a fixed order too, never by a BLAS matmul (whose rounding depends on the
library, the device and the shape): so every slice of a direction, on every device, has the bits
of the same range of the whole. Both are ``torch.library`` custom ops with a kernel per device:
C++ on the host (``cpu_kernels.cpp``, built on first use), Triton on CUDA (``cuda.py``); any other
device (and a host without a compiler) runs the torch reference (``reference.py``, ``philox.py``).
Under ``FakeTensorMode`` the op only checks that its tensors share one device, as the real kernels
require.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from . import philox, reference
from .philox import GENERATOR

__all__ = ["GENERATOR", "apply_", "direction_key", "gaussian", "lowrank_core"]

logger = logging.getLogger("subzero_ds")


def direction_key(seed: int) -> tuple[int, int]:
    """The Philox key (two 32-bit words) of a 64-bit seed."""
    return seed & philox.MASK32, (seed >> 32) & philox.MASK32


def apply_(out: torch.Tensor, src: torch.Tensor, *, beta: float, alpha: float, key: tuple[int, int] = (0, 0),
           offset: int = 0, dense: torch.Tensor | None = None,
           lowrank: tuple[torch.Tensor, torch.Tensor] | None = None, rounding_key: tuple[int, int] | None = None
           ) -> torch.Tensor:
    """``out = round(beta·src + alpha·d)`` elementwise, in fp32, rounded to ``out``'s dtype.

    Args:
        out: 1-D contiguous tensor written in place (may be ``src`` itself).
        src: 1-D tensor of ``out``'s dtype, device and size; not read when ``beta`` is 0.
        beta, alpha: the coefficients (applied as fp32).
        key: Philox key of the Gaussian direction; element i of ``out`` gets its element ``offset + i``.
        offset: flat position of ``out[0]`` in the whole direction.
        dense: an fp32 direction slice to use instead of the Gaussian one.
        lowrank: ``(U, CVᵀ)`` (m×r and r×n fp32, contiguous): the direction U·CVᵀ of an m×n matrix, of
            which ``out`` holds the flat elements from ``offset`` on.
        rounding_key: round a bf16 ``out`` stochastically with these random bits (position ``offset + i``)
            instead of to nearest.

    Returns:
        ``out``.
    """
    u, cvt = lowrank if lowrank is not None else (None, None)
    _apply(out, src, dense, u, cvt, float(beta), float(alpha), key[0], key[1], offset, rounding_key is not None,
           *(rounding_key or (0, 0)))
    return out


def lowrank_core(core: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
    """``core · vt`` (r×r times r×n, fp32) summed in increasing index on every device: the CVᵀ of a direction."""
    out = torch.empty(core.shape[0], vt.shape[1], dtype=torch.float32, device=vt.device)
    _lowrank_core(out, core, vt)
    return out


def gaussian(numel: int, key: tuple[int, int], offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 N(0, 1) values of elements [offset, offset + numel) of the direction with ``key``, on ``device``."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    return apply_(out, out, beta=0.0, alpha=1.0, key=key, offset=offset)


@torch.library.custom_op("subzero_ds::apply_", mutates_args=("out",))
def _apply(out: torch.Tensor, src: torch.Tensor, dense: Optional[torch.Tensor], u: Optional[torch.Tensor],
           cvt: Optional[torch.Tensor], beta: float, alpha: float, key0: int, key1: int, offset: int, stochastic: bool,
           rkey0: int, rkey1: int) -> None:
    _check(out, src, dense, u, cvt, offset, stochastic)
    reference.apply_(out, src, dense, u, cvt, beta, alpha, (key0, key1), offset, (rkey0, rkey1) if stochastic else None)


@_apply.register_kernel("cpu")
def _apply_cpu(out, src, dense, u, cvt, beta, alpha, key0, key1, offset, stochastic, rkey0, rkey1) -> None:
    _check(out, src, dense, u, cvt, offset, stochastic)
    module = _host_module()
    if module is None:
        reference.apply_(out, src, dense, u, cvt, beta, alpha, (key0, key1), offset,
                         (rkey0, rkey1) if stochastic else None)
        return
    module.apply(out, src, dense, u, cvt, beta, alpha, key0, key1, offset, stochastic, rkey0, rkey1)


@_apply.register_kernel("cuda")
def _apply_cuda(out, src, dense, u, cvt, beta, alpha, key0, key1, offset, stochastic, rkey0, rkey1) -> None:
    _check(out, src, dense, u, cvt, offset, stochastic)
    from . import cuda

    cuda.apply_(out, src, dense, (u, cvt) if u is not None else None, beta, alpha, (key0, key1), offset,
                (rkey0, rkey1) if stochastic else None)


@_apply.register_fake
def _apply_fake(out, src, dense, u, cvt, beta, alpha, key0, key1, offset, stochastic, rkey0, rkey1) -> None:
    _check(out, src, dense, u, cvt, offset, stochastic)


@torch.library.custom_op("subzero_ds::lowrank_core", mutates_args=("out",))
def _lowrank_core(out: torch.Tensor, core: torch.Tensor, vt: torch.Tensor) -> None:
    _check_core(out, core, vt)
    reference.lowrank_core_(out, core, vt)


@_lowrank_core.register_kernel("cpu")
def _lowrank_core_cpu(out, core, vt) -> None:
    _check_core(out, core, vt)
    module = _host_module()
    if module is None:
        reference.lowrank_core_(out, core, vt)
    else:
        module.lowrank_core(out, core, vt)


@_lowrank_core.register_kernel("cuda")
def _lowrank_core_cuda(out, core, vt) -> None:
    _check_core(out, core, vt)
    from . import cuda

    cuda.lowrank_core(out, core, vt)


@_lowrank_core.register_fake
def _lowrank_core_fake(out, core, vt) -> None:
    _check_core(out, core, vt)


def _host_module():
    from .cpu import compiled

    return compiled()


def _same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) != 1:
        raise RuntimeError(f"subzero_ds kernels need their tensors on one device, got {devices}")


def _check_core(out: torch.Tensor, core: torch.Tensor, vt: torch.Tensor) -> None:
    _same_device(out=out, core=core, vt=vt)
    rank, cols = core.shape[0], vt.shape[1]
    if core.shape != (rank, rank) or vt.shape != (rank, cols) or out.shape != (rank, cols) or not all(
            t.dtype == torch.float32 and t.is_contiguous() for t in (out, core, vt)):
        raise RuntimeError(f"subzero_ds::lowrank_core needs contiguous fp32 core r×r, vt and out r×n, got "
                           f"{tuple(core.shape)}, {tuple(vt.shape)}, {tuple(out.shape)}")


def _check(out: torch.Tensor, src: torch.Tensor, dense: torch.Tensor | None, u: torch.Tensor | None,
           cvt: torch.Tensor | None, offset: int, stochastic: bool) -> None:
    """The contract every kernel relies on (the real ones would read garbage or crash otherwise)."""
    _same_device(out=out, src=src, dense=dense, u=u, cvt=cvt)
    if (u is None) != (cvt is None) or (u is not None and not (
            u.dim() == 2 and cvt.dim() == 2 and u.shape[1] == cvt.shape[0] and u.dtype == cvt.dtype == torch.float32
            and u.is_contiguous() and cvt.is_contiguous() and offset + out.numel() <= u.shape[0] * cvt.shape[1])):
        raise RuntimeError("subzero_ds::apply_ needs contiguous fp32 U (m×r) and CVᵀ (r×n) covering the range")
    if out.dim() != 1 or not out.is_contiguous() or src.numel() != out.numel() or src.dtype != out.dtype:
        raise RuntimeError(f"subzero_ds::apply_ needs 1-D contiguous out/src of one size and dtype, got "
                           f"{tuple(out.shape)} {out.dtype} and {tuple(src.shape)} {src.dtype}")
    if dense is not None and (dense.dtype != torch.float32 or dense.numel() != out.numel()):
        raise RuntimeError(f"subzero_ds::apply_ needs an fp32 dense direction of {out.numel()} elements")
    if stochastic and out.dtype not in (torch.bfloat16, torch.float32):
        raise RuntimeError(f"stochastic rounding is implemented for bf16 (fp32 needs none), not {out.dtype}")
