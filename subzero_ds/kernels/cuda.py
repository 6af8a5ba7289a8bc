"""The generate-and-apply of a ZO pass on CUDA: one Triton kernel per shard (and pass).

The same arithmetic as ``philox.py`` and ``cpu_kernels.cpp``, operation for operation: Philox4x32-10
in uint32, then the Box-Muller transform as IEEE fp32 multiplies and adds, compiled with
``enable_fp_fusion=False`` (no fused multiply-add) and a correctly rounded ``sqrt_rn``. So a
direction on the GPU has the same bits as on the host: a shard offloaded to CPU and its gathered
layer on the GPU see one direction, and checkpoints move between CPU and GPU machines.

Each program handles ``BLOCK`` consecutive elements; an element computes the Philox words of its
own counter (4× redundant per counter, cheap next to the memory traffic on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import philox

BLOCK = 1024


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = tl.mul(_c2, 0xCD9E8D57, sanitize_overflow=False)
        c3 = tl.mul(_c0, 0xD2511F53, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _words(element, key0, key1):
    """The four Philox words of each element's counter element // 4 = (lo32, hi32, 0, 0)."""
    counter = element >> 2
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    zero = c0 * 0
    k0 = (zero + key0).to(tl.uint32)
    k1 = (zero + key1).to(tl.uint32)
    return _philox(c0, c1, zero, zero, k0, k1)


@triton.jit
def _normal(element, key0, key1, SQRT_HALF: tl.constexpr, L0: tl.constexpr, L1: tl.constexpr,
            L2: tl.constexpr, L3: tl.constexpr, L4: tl.constexpr, L5: tl.constexpr, L6: tl.constexpr,
            L7: tl.constexpr, L8: tl.constexpr, LN2_HI: tl.constexpr, LN2_LO: tl.constexpr,
            TWO_PI: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, C0: tl.constexpr,
            C1: tl.constexpr, C2: tl.constexpr):
    w0, w1, w2, w3 = _words(element, key0, key1)
    lane = element & 3
    first_pair = lane < 2
    a = tl.where(first_pair, w0, w2)
    b = tl.where(first_pair, w1, w3)
    # log u, u = k / 2^24, k = 2^24 - (a >> 8): k = m 2^e exactly, m in [sqrt(1/2), sqrt(2)).
    k = (16777216 - (a >> 8).to(tl.int32)).to(tl.float32)
    bits = k.to(tl.int32, bitcast=True)
    exponent = (bits >> 23) - 126
    mantissa = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = (mantissa < SQRT_HALF).to(tl.int32)
    exponent = exponent - small
    x = mantissa * (1 + small).to(tl.float32) - 1.0
    scaled_exponent = (exponent - 24).to(tl.float32)
    z = x * x
    y = tl.zeros_like(x) + L0
    y = y * x + L1
    y = y * x + L2
    y = y * x + L3
    y = y * x + L4
    y = y * x + L5
    y = y * x + L6
    y = y * x + L7
    y = y * x + L8
    y = y * x * z
    y = y + scaled_exponent * LN2_LO
    y = y - 0.5 * z
    log_u = x + y
    log_u = log_u + scaled_exponent * LN2_HI
    radius = tl.sqrt_rn(-2.0 * log_u)
    # angle = 2 pi b24 / 2^24: quadrant and remainder from the integer, exactly.
    b24 = (b >> 8).to(tl.int32)
    quadrant = (b24 + (1 << 21)) >> 22
    t = (b24 - (quadrant << 22)).to(tl.float32) * TWO_PI
    tz = t * t
    sin_t = ((S0 * tz + S1) * tz + S2) * tz * t + t
    cos_t = ((C0 * tz + C1) * tz + C2) * tz * tz - 0.5 * tz + 1.0
    swap = (quadrant & 1) != 0
    cos_q = tl.where(swap, sin_t, cos_t)
    sin_q = tl.where(swap, cos_t, sin_t)
    cos_q = tl.where((((quadrant + 1) >> 1) & 1) != 0, -cos_q, cos_q)
    sin_q = tl.where(((quadrant >> 1) & 1) != 0, -sin_q, sin_q)
    return tl.where((lane & 1) == 0, radius * cos_q, radius * sin_q)


@triton.jit
def _apply_kernel(out_ptr, src_ptr, dense_ptr, u_ptr, cvt_ptr, rank, cols, n, beta, alpha, key0, key1, offset,
                  rkey0, rkey1, HAS_DENSE: tl.constexpr, HAS_LOWRANK: tl.constexpr, READ_SRC: tl.constexpr,
                  BF16: tl.constexpr, STOCHASTIC: tl.constexpr,
                  BLOCK: tl.constexpr, SQRT_HALF: tl.constexpr, L0: tl.constexpr, L1: tl.constexpr,
                  L2: tl.constexpr, L3: tl.constexpr, L4: tl.constexpr, L5: tl.constexpr, L6: tl.constexpr,
                  L7: tl.constexpr, L8: tl.constexpr, LN2_HI: tl.constexpr, LN2_LO: tl.constexpr,
                  TWO_PI: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
                  C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = index < n
    if HAS_DENSE:
        direction = tl.load(dense_ptr + index, mask=mask, other=0.0)
    elif HAS_LOWRANK:
        # Σ_k U[row, k]·CVᵀ[k, col] in increasing k: the host kernel's order of operations.
        element = index + offset
        row = element // cols
        col = element - row * cols
        direction = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(rank):
            u = tl.load(u_ptr + row * rank + k, mask=mask, other=0.0)
            c = tl.load(cvt_ptr + k * cols + col, mask=mask, other=0.0)
            direction = direction + u * c
    else:
        direction = _normal(index + offset, key0, key1, SQRT_HALF, L0, L1, L2, L3, L4, L5, L6, L7, L8,
                            LN2_HI, LN2_LO, TWO_PI, S0, S1, S2, C0, C1, C2)
    if READ_SRC:
        kept = beta * tl.load(src_ptr + index, mask=mask, other=0.0).to(tl.float32)
    else:
        kept = tl.zeros_like(direction)
    value = kept + alpha * direction
    if BF16:
        # Rounded on the bits (as c10::BFloat16 does): round-to-nearest-even, or stochastic.
        raw = value.to(tl.uint32, bitcast=True)
        finite = (raw & 0x7F800000) != 0x7F800000
        if STOCHASTIC:
            r0, r1, r2, r3 = _words(index + offset, rkey0, rkey1)
            lane = (index + offset) & 3
            word = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
            bias = word & 0xFFFF
        else:
            bias = ((raw >> 16) & 1) + 0x7FFF
        raw = tl.where(finite | ((raw & 0x007FFFFF) == 0), (raw + bias) & 0xFFFF0000, 0x7FC00000)  # NaN -> qNaN
        tl.store(out_ptr + index, (raw >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + index, value.to(out_ptr.dtype.element_ty), mask=mask)


_CONSTANTS = dict(
    SQRT_HALF=philox.SQRT_HALF, **{f"L{i}": c for i, c in enumerate(philox.LOG_POLY)},
    LN2_HI=philox.LN2_HI, LN2_LO=philox.LN2_LO, TWO_PI=philox.TWO_PI_OVER_2_24,
    **{f"S{i}": c for i, c in enumerate(philox.SIN_POLY)}, **{f"C{i}": c for i, c in enumerate(philox.COS_POLY)},
)


def apply_(out: torch.Tensor, src: torch.Tensor, dense: torch.Tensor | None,
           lowrank: tuple[torch.Tensor, torch.Tensor] | None, beta: float, alpha: float, key: tuple[int, int],
           offset: int, rounding_key: tuple[int, int] | None) -> None:
    """out = round(beta·src + alpha·d) on the GPU; see :func:`subzero_ds.kernels.apply_`."""
    n = out.numel()
    if n == 0:
        return
    u, cvt = lowrank if lowrank is not None else (out, out)
    rank, cols = (u.shape[1], cvt.shape[1]) if lowrank is not None else (0, 1)
    _apply_kernel[(triton.cdiv(n, BLOCK),)](
        out, src, dense if dense is not None else out, u, cvt, rank, cols, n, float(beta), float(alpha), key[0],
        key[1], offset, *(rounding_key or (0, 0)), HAS_DENSE=dense is not None, HAS_LOWRANK=lowrank is not None,
        READ_SRC=beta != 0.0, BF16=out.dtype == torch.bfloat16, STOCHASTIC=rounding_key is not None,
        BLOCK=BLOCK, enable_fp_fusion=False, **_CONSTANTS,
    )


@triton.jit
def _lowrank_core_kernel(out_ptr, core_ptr, vt_ptr, rank, cols, BLOCK: tl.constexpr):
    k = tl.program_id(0)
    col = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = col < cols
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for l in range(rank):  # increasing l: the host kernel's order of operations
        acc = acc + tl.load(core_ptr + k * rank + l) * tl.load(vt_ptr + l * cols + col, mask=mask, other=0.0)
    tl.store(out_ptr + k * cols + col, acc, mask=mask)


def lowrank_core(out: torch.Tensor, core: torch.Tensor, vt: torch.Tensor) -> None:
    """out = core · vt (r×r · r×n) on the GPU; see :func:`subzero_ds.kernels.lowrank_core`."""
    rank, cols = core.shape[0], vt.shape[1]
    _lowrank_core_kernel[(rank, triton.cdiv(cols, BLOCK))](out, core, vt, rank, cols, BLOCK=BLOCK,
                                                          enable_fp_fusion=False)
