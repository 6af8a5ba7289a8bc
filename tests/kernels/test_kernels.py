"""The counter-based generator and the generate-and-apply kernels.

Philox4x32-10 against Random123's known-answer vectors; the Gaussian transform against a numpy
reference written here from the spec; the C++ kernel, the torch reference and the Triton kernel
(run by Triton's interpreter on the CPU) bit-identical to each other, for any slice.
"""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from subzero_ds import kernels
from subzero_ds.kernels import philox
from subzero_ds.kernels.cpu import compiled

# Random123's kat_vectors for philox4x32_10: (counter, key, result).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def python_philox(counter, key):
    """Philox4x32-10 on Python integers, straight from the paper."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def numpy_normals(start, end, key):
    """The spec of a direction, in numpy: element e = lane e % 4 of counter e // 4, Box-Muller in fp32."""
    f = np.float32
    words = np.array([python_philox((c & 0xFFFFFFFF, c >> 32, 0, 0), key) for c in range(start // 4, (end + 3) // 4)],
                     dtype=np.uint32)
    a = words[:, [0, 0, 2, 2]].reshape(-1)  # lanes 0, 1 from words (0, 1); lanes 2, 3 from (2, 3)
    b = words[:, [1, 1, 3, 3]].reshape(-1)
    k = (np.uint32(1 << 24) - (a >> np.uint32(8))).astype(np.float32)  # u = k / 2^24 in [2^-24, 1]
    mantissa, exponent = np.frexp(k)  # k = mantissa · 2^exponent, mantissa in [0.5, 1)
    small = mantissa < f(philox.SQRT_HALF)
    x = np.where(small, mantissa + mantissa, mantissa) - f(1)
    scaled_exponent = (exponent - small - 24).astype(np.float32)
    z = x * x
    y = np.full_like(x, f(philox.LOG_POLY[0]))
    for c in philox.LOG_POLY[1:]:
        y = y * x + f(c)
    y = y * x * z + scaled_exponent * f(philox.LN2_LO) - f(0.5) * z
    log_u = x + y + scaled_exponent * f(philox.LN2_HI)
    radius = np.sqrt(f(-2) * log_u)
    b24 = (b >> np.uint32(8)).astype(np.int64)
    quadrant = (b24 + (1 << 21)) >> 22
    t = (b24 - (quadrant << 22)).astype(np.float32) * f(philox.TWO_PI_OVER_2_24)
    tz = t * t
    s, c = (f(v) for v in philox.SIN_POLY), (f(v) for v in philox.COS_POLY)
    s0, s1, s2 = s
    c0, c1, c2 = c
    sin_t = ((s0 * tz + s1) * tz + s2) * tz * t + t
    cos_t = ((c0 * tz + c1) * tz + c2) * tz * tz - f(0.5) * tz + f(1)
    quadrant %= 4
    cos_q = np.choose(quadrant, [cos_t, -sin_t, -cos_t, sin_t])
    sin_q = np.choose(quadrant, [sin_t, cos_t, -sin_t, -cos_t])
    values = np.where(np.arange(len(a)) % 2 == 0, radius * cos_q, radius * sin_q)
    first = start - 4 * (start // 4)
    return torch.from_numpy(values[first : first + end - start].astype(np.float32))


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    assert python_philox(counter, key) == expected
    words = philox.philox4x32(*(torch.tensor([c]) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected
    assert tuple(compiled().philox_words(torch.tensor([counter]), *key)[0].tolist()) == expected


@pytest.mark.parametrize("start,end", [(0, 4), (0, 1000), (3, 517), (2**33 + 6, 2**33 + 300)])
def test_normals_equal_the_numpy_reference_bit_for_bit(start, end):
    key = (0x12345678, 0x9ABCDEF0)
    expected = numpy_normals(start, end, key)
    assert torch.equal(philox.normals(start, end, key), expected)
    assert torch.equal(kernels.gaussian(end - start, key, start), expected)


def test_normals_are_standard_normal_and_keys_are_independent():
    a = kernels.gaussian(1 << 21, (1, 2))
    assert abs(a.mean().item()) < 4 / math.sqrt(a.numel())
    assert a.var().item() == pytest.approx(1.0, abs=0.01)
    assert (a.abs() > 3).float().mean().item() == pytest.approx(0.0027, abs=0.0005)  # the tails are there
    b = kernels.gaussian(1 << 21, (1, 3))
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.005


@pytest.mark.parametrize("pieces", [[5, 300, 1], [256, 256], [1, 1, 1, 1000], [777]])
def test_any_slice_equals_the_same_range_of_the_whole(pieces):
    key, offset = (9, 10), 37
    whole = kernels.gaussian(sum(pieces), key, offset)
    cuts, lo = [], offset
    for size in pieces:
        cuts.append(kernels.gaussian(size, key, lo))
        lo += size
    assert torch.equal(torch.cat(cuts), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_dense", [False, True])
def test_kernel_equals_the_reference_for_every_dtype(dtype, use_dense):
    src = torch.randn(5000).to(dtype)
    dense = torch.randn(5000) if use_dense else None
    out, expected = torch.empty_like(src), torch.empty_like(src)
    kernels.apply_(out, src, beta=0.999, alpha=-3e-3, key=(4, 5), offset=123, dense=dense)
    kernels.reference.apply_(expected, src, dense, None, None, 0.999, -3e-3, (4, 5), 123, None)
    assert torch.equal(out, expected)
    d = dense if use_dense else kernels.gaussian(5000, (4, 5), 123)
    assert torch.equal(out, (kernels.reference._as_fp32(0.999) * src.float() + kernels.reference._as_fp32(-3e-3) * d).to(dtype))


def lowrank_factors(m=37, n=23, r=5):
    generator = torch.Generator().manual_seed(0)
    u, core, vt = (torch.randn(shape, generator=generator) for shape in ((m, r), (r, r), (r, n)))
    return u, kernels.lowrank_core(core, vt), core, vt


def test_lowrank_core_is_core_times_vt_in_a_fixed_order():
    u, cvt, core, vt = lowrank_factors()
    expected = torch.empty_like(cvt)
    kernels.reference.lowrank_core_(expected, core, vt)
    assert torch.equal(cvt, expected)
    torch.testing.assert_close(cvt, (core.double() @ vt.double()).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowrank_apply_is_u_times_cvt_and_equals_the_reference(dtype):
    u, cvt, _, _ = lowrank_factors()
    src = torch.randn(37 * 23 - 50).to(dtype)
    out, expected = torch.empty_like(src), torch.empty_like(src)
    kernels.apply_(out, src, beta=0.5, alpha=2.0, offset=50, lowrank=(u, cvt))
    kernels.reference.apply_(expected, src, None, u, cvt, 0.5, 2.0, (0, 0), 50, None)
    assert torch.equal(out, expected)
    d = (u.double() @ cvt.double()).view(-1)[50:]
    torch.testing.assert_close(out.double(), (0.5 * src.double() + 2.0 * d).to(dtype).double(), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("cuts", [[0, 1, 23, 24, 300, 851], [0, 851], [0, 5, 6, 7, 851], [0, 400, 851]])
def test_lowrank_slices_are_bit_identical_to_the_whole(cuts):
    u, cvt, _, _ = lowrank_factors()
    whole = torch.empty(851)
    kernels.apply_(whole, whole, beta=0.0, alpha=1.0, lowrank=(u, cvt))
    pieces = []
    for lo, hi in zip(cuts, cuts[1:]):
        piece = torch.empty(hi - lo)
        pieces.append(kernels.apply_(piece, piece, beta=0.0, alpha=1.0, offset=lo, lowrank=(u, cvt)))
    assert torch.equal(torch.cat(pieces), whole)


def test_apply_in_place_and_beta_zero_ignores_src():
    theta = torch.randn(1000)
    expected = theta + 0.5 * kernels.gaussian(1000, (1, 1), 7)
    kernels.apply_(theta, theta, beta=1.0, alpha=0.5, key=(1, 1), offset=7)
    assert torch.equal(theta, expected)
    garbage = torch.full((1000,), float("nan"))
    assert torch.equal(kernels.apply_(garbage, garbage, beta=0.0, alpha=1.0, key=(1, 1), offset=7),
                       kernels.gaussian(1000, (1, 1), 7))


def test_stochastic_rounding_is_unbiased_and_matches_the_reference():
    """E[round(θ + Δ)] = θ + Δ in fp32, though Δ is far below half a bf16 ulp of θ (nearest keeps none)."""
    n, delta = 1 << 20, 1e-5  # half an ulp of 0.02 in bf16 is 6.1e-5
    src = torch.full((n,), 0.02, dtype=torch.bfloat16)
    ones = torch.ones(n)
    nearest = kernels.apply_(torch.empty_like(src), src, beta=1.0, alpha=delta, dense=ones)
    assert torch.equal(nearest, src)  # the whole update is rounded away
    stochastic = kernels.apply_(torch.empty_like(src), src, beta=1.0, alpha=delta, dense=ones, rounding_key=(3, 4))
    exact = float(src[0]) + kernels.reference._as_fp32(delta)
    ulp = 2**-6 * 2**-7  # bf16 spacing in [2^-6, 2^-5)
    assert set(stochastic.float().unique().tolist()) == {float(src[0]), float(src[0]) + ulp}
    sigma = ulp * 0.5 / math.sqrt(n)
    assert stochastic.double().mean().item() == pytest.approx(exact, abs=5 * sigma)
    expected = torch.empty_like(src)
    kernels.reference.apply_(expected, src, ones, None, None, 1.0, delta, (0, 0), 0, (3, 4))
    assert torch.equal(stochastic, expected)
    again = kernels.apply_(torch.empty_like(src), src, beta=1.0, alpha=delta, dense=ones, rounding_key=(3, 4))
    assert torch.equal(again, stochastic)  # seeded: a pure function of (key, position)


def test_mixed_devices_are_refused():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.empty(8, device="cuda")
        kernels.apply_(out, torch.empty(8, device="cuda"), beta=1.0, alpha=1.0)  # one device: fine
        with pytest.raises(RuntimeError, match="one device"):
            kernels.apply_(out, torch.empty(8, device="cpu"), beta=1.0, alpha=1.0)
        with pytest.raises(RuntimeError, match="one device"):
            kernels.apply_(out, out, beta=1.0, alpha=1.0, dense=torch.empty(8, device="cpu"))


TRITON_CHECK = textwrap.dedent("""
    import torch
    from subzero_ds import kernels
    from subzero_ds.kernels import cuda
    for start, n in [(0, 3000), (5, 2049), (2**33 + 7, 1500)]:
        out = torch.empty(n)
        cuda.apply_(out, out, None, None, 0.0, 1.0, (0xDEADBEEF, 0x12345678), start, None)
        assert torch.equal(out, kernels.gaussian(n, (0xDEADBEEF, 0x12345678), start)), start
    src = torch.randn(3000)
    u, core, vt = torch.randn(70, 5), torch.randn(5, 5), torch.randn(5, 50)
    cvt = torch.empty(5, 50)
    cuda.lowrank_core(cvt, core, vt)
    assert torch.equal(cvt, kernels.lowrank_core(core, vt))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for dense, lowrank in ((None, None), (torch.randn(3000), None), (None, (u, cvt))):
            for rounding in ((None, (5, 6)) if dtype == torch.bfloat16 else (None,)):
                s = src.to(dtype)
                out, expected = torch.empty_like(s), torch.empty_like(s)
                cuda.apply_(out, s, dense, lowrank, 0.999, -1e-2, (1, 2), 11, rounding)
                kernels.reference.apply_(expected, s, dense, *(lowrank or (None, None)), 0.999, -1e-2, (1, 2), 11,
                                         rounding)
                assert torch.equal(out, expected), (dtype, dense is None, lowrank is None, rounding)
    print("triton kernel matches")
""")


def test_triton_kernel_equals_the_reference_in_the_interpreter():
    """The CUDA kernel's arithmetic, run by Triton's interpreter (numpy) on this CPU machine."""
    pytest.importorskip("triton", reason="the test extra installs triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton kernel matches" in result.stdout
