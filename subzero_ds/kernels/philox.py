"""The counter-based generator every direction comes from, as a plain vectorized torch reference.

Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC'11;
the known-answer vectors of Random123) maps a 64-bit key and a 128-bit counter to four 32-bit
words. Element ``e`` of a direction is lane ``e % 4`` of counter ``e // 4`` (as the words
``(lo32, hi32, 0, 0)``): a Box-Muller pair turns words 0, 1 into lanes 0, 1 and words 2, 3 into
lanes 2, 3. So the value at ``e`` is a function of ``(key, e)`` alone, on any device and for any
slice.

The transform to N(0, 1) is written as a fixed sequence of IEEE fp32 multiplies, adds, one
conversion and one correctly rounded square root (no fused multiply-add, no library ``log``/``cos``,
whose last bits differ between libm, Sleef and CUDA's libdevice): ``log`` by Cephes' ``logf``
polynomial after an exact exponent split, ``cos``/``sin`` by Cephes' polynomials after an *exact*
quadrant reduction done on the integer angle. The C++ kernel (``cpu_kernels.cpp``) and the Triton
kernel (``cuda.py``) compute the same sequence, so CPU and CUDA give the same bits; this file is
their reference (and the implementation for devices without a kernel, e.g. fake tensors).
"""

from __future__ import annotations

import torch

# Name and version of the generator, recorded in checkpoints: a resume with another is refused.
GENERATOR = "philox4x32-10+box-muller-cephes-fp32/1"

MASK32 = 0xFFFFFFFF
PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10
ELEMENTS_PER_COUNTER = 4


def _f32(hex_literal: str) -> float:
    """An fp32 constant, written as its exact hexadecimal value (parsing is then exact everywhere)."""
    return float.fromhex(hex_literal)


# fp32 constants (the C++ and Triton kernels use the same values).
SQRT_HALF = _f32("0x1.6a09e6p-1")
LOG_POLY = tuple(_f32(h) for h in (  # Cephes logf: log(1+x) = x - x²/2 + x³·P(x), |x| <= sqrt(2)/2 - 1/2
    "0x1.204376p-4", "-0x1.d7a370p-4", "0x1.de4a34p-4", "-0x1.fcba9ep-4", "0x1.23d37ep-3",
    "-0x1.555ca0p-3", "0x1.999d58p-3", "-0x1.fffff8p-3", "0x1.555554p-2"))
LN2_HI, LN2_LO = _f32("0x1.63p-1"), _f32("-0x1.bd0106p-13")
TWO_PI_OVER_2_24 = _f32("0x1.921fb6p-22")
SIN_POLY = tuple(_f32(h) for h in ("-0x1.9943f2p-13", "0x1.11073cp-7", "-0x1.555546p-3"))
COS_POLY = tuple(_f32(h) for h in ("0x1.99eb9cp-16", "-0x1.6c0c34p-10", "0x1.55554ap-5"))


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, key0: int, key1: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of counters (c0, c1, c2, c3): int64 tensors holding 32-bit values; same for the result."""
    k0, k1 = key0 & MASK32, key1 & MASK32
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_MUL[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_MUL[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_WEYL[0]) & MASK32, (k1 + PHILOX_WEYL[1]) & MASK32
    return c0, c1, c2, c3


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a·multiplier (a < 2^32) without overflowing int64: a is split in 16-bit halves."""
    low = (a & 0xFFFF) * multiplier
    high = (a >> 16) * multiplier
    middle = low + ((high & 0xFFFF) << 16)
    return (high >> 16) + (middle >> 32), middle & MASK32


def box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r·cos θ, r·sin θ) from two words (int64 tensors of 32-bit values), r = sqrt(-2 log u), θ = 2π v.

    u = (2^24 - (a >> 8)) / 2^24 lies in [2^-24, 1] (never 0); v = (b >> 8) / 2^24 in [0, 1).
    """
    f32 = torch.float32
    # log u = log k - 24 log 2 with k = 2^24 - (a >> 8): split k = m·2^e exactly, m in [sqrt(1/2), sqrt(2)).
    k = (16777216 - (a >> 8)).to(f32)
    bits = k.view(torch.int32).to(torch.int64)
    exponent = (bits >> 23) - 126
    mantissa = ((bits & 0x007FFFFF) | 0x3F000000).to(torch.int32).view(f32)  # [0.5, 1)
    small = (mantissa < SQRT_HALF).to(torch.int64)
    exponent = exponent - small
    x = mantissa * (1 + small).to(f32) - 1.0
    scaled_exponent = (exponent - 24).to(f32)
    z = x * x
    y = torch.full_like(x, LOG_POLY[0])
    for coefficient in LOG_POLY[1:]:
        y = y * x + coefficient
    y = y * x * z
    y = y + scaled_exponent * LN2_LO
    y = y - 0.5 * z
    log_u = x + y
    log_u = log_u + scaled_exponent * LN2_HI
    # Correctly rounded sqrt: fp32 through fp64 is exact; torch's fp32 AVX-512 sqrt is not (seen here).
    radius = torch.sqrt((-2.0 * log_u).double()).float()
    # θ = 2π·b24 / 2^24: the quadrant q and the remainder come from the integer, exactly.
    b24 = b >> 8
    quadrant = (b24 + (1 << 21)) >> 22  # 0 … 4 (4 is a full turn)
    t = (b24 - (quadrant << 22)).to(f32) * TWO_PI_OVER_2_24  # [-π/4, π/4]
    tz = t * t
    sin_t = ((SIN_POLY[0] * tz + SIN_POLY[1]) * tz + SIN_POLY[2]) * tz * t + t
    cos_t = ((COS_POLY[0] * tz + COS_POLY[1]) * tz + COS_POLY[2]) * tz * tz - 0.5 * tz + 1.0
    swap = (quadrant & 1).bool()
    cos_q = torch.where(swap, sin_t, cos_t)
    sin_q = torch.where(swap, cos_t, sin_t)
    cos_q = torch.where((((quadrant + 1) >> 1) & 1).bool(), -cos_q, cos_q)
    sin_q = torch.where(((quadrant >> 1) & 1).bool(), -sin_q, sin_q)
    return radius * cos_q, radius * sin_q


def counter_words(start: int, end: int, key: tuple[int, int], device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(words, lane) of elements [start, end): the Philox word set of each element's counter and its lane."""
    elements = torch.arange(start, end, dtype=torch.int64, device=device)
    counters = elements >> 2
    zeros = torch.zeros_like(counters)
    words = torch.stack(philox4x32(counters & MASK32, counters >> 32, zeros, zeros, *key))
    return words, elements & 3


def normals(start: int, end: int, key: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """N(0, 1) values (fp32) of elements [start, end) of the direction with ``key``."""
    words, lane = counter_words(start, end, key, device)
    pair = lane >> 1  # lanes 0, 1 come from words 0, 1; lanes 2, 3 from words 2, 3
    a = torch.where(pair == 0, words[0], words[2])
    b = torch.where(pair == 0, words[1], words[3])
    cos_value, sin_value = box_muller(a, b)
    return torch.where((lane & 1) == 0, cos_value, sin_value)


def rounding_bits(start: int, end: int, key: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """16 random bits per element of [start, end) (int64): the low half of the element's Philox word."""
    words, lane = counter_words(start, end, key, device)
    return words.gather(0, lane.unsqueeze(0)).squeeze(0) & 0xFFFF


def stochastic_round_bf16(values: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """fp32 ``values`` rounded to bf16 up or down with probability given by the dropped low 16 bits.

    Adding 16 uniform random bits below the kept ones and truncating rounds the magnitude up with
    probability equal to the dropped fraction: E[result] = value. Non-finite values round to nearest.
    """
    raw = values.view(torch.int32).to(torch.int64) & MASK32
    rounded = ((raw + bits) & 0xFFFF0000).to(torch.int64)
    rounded = torch.where(rounded >= 1 << 31, rounded - (1 << 32), rounded).to(torch.int32).view(torch.float32)
    return torch.where(torch.isfinite(values), rounded, values).to(torch.bfloat16)
