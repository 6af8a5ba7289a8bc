"""S-MeZO (Liu et al., "Sparse MeZO: less parameters for better performance in zeroth-order LLM
fine-tuning", arXiv 2402.15751): probe and update only the small-magnitude weights.

D = m(θ) ⊙ z with z the MeZO direction and m(θ) = [|θ| ≤ τ_p] for each parameter p, where τ_p is
the k-th smallest |θ| of the *whole* parameter, k = ⌈(1 − s)·numel⌉ (s: ``sparsity``, the share
left out). Under ZeRO-3 no rank holds a whole parameter, so τ_p is found exactly by bisection on
the bit patterns of |θ| (non-negative floats sort as their bits): 31 rounds, each one all-reduce of
every parameter's count of |θ| ≤ candidate. The result is the exact order statistic, the same on
every world size. The thresholds are recomputed every ``mask_interval`` steps from the current θ;
between, the mask follows θ through the fixed thresholds. The mask is evaluated from the θ a write
starts from (``src``), so probes and update of a step share it.
"""

from __future__ import annotations

import math

import torch

from pydantic import Field

from .. import kernels
from ..distributed import sum_over_ranks
from .base import Direction
from .mezo import gaussian_key
from .registry import MethodSpec, Options, register_method

CHUNK_ELEMENTS = 1 << 22
FLOAT_BITS_INF = 0x7F800000  # the bits of +inf: every finite |θ| lies below


class SparseMeZOOptions(Options):
    """S-MeZO's keys in the ``"subzero"`` section."""

    sparsity: float = Field(
        0.75, gt=0.0, lt=1.0, allow_inf_nan=False,
        description="S-MeZO: the share of each parameter's largest-magnitude elements left out, in (0, 1).")
    mask_interval: int = Field(
        100, ge=1, description="S-MeZO: steps between recomputations of the per-parameter magnitude thresholds.")


class SparseDirection(Direction):
    """The MeZO direction restricted to |θ| ≤ τ_p.

    Args:
        seed: the run seed.
        sparsity: s, the share of each parameter (its largest magnitudes) neither probed nor updated.
        interval: steps between recomputations of the thresholds.
    """

    def __init__(self, seed: int, sparsity: float, interval: int) -> None:
        super().__init__(seed)
        self.sparsity, self.interval = sparsity, interval
        self.thresholds: dict[str, float] = {}

    def begin_step_(self, step, shards):
        if step % self.interval == 0 or not self.thresholds:
            self.thresholds = magnitude_thresholds(shards, self.sparsity)

    def apply_(self, out, src, name, shape, step, start, beta, alpha, rounding_key=None, query=0):
        if beta == 0.0:
            raise ValueError("S-MeZO's direction depends on θ: apply it with src = θ and beta != 0")
        threshold = self.thresholds[name]
        key = gaussian_key(self.seed, step, name, shape, query)
        for lo in range(0, out.numel(), CHUNK_ELEMENTS):
            size = min(CHUNK_ELEMENTS, out.numel() - lo)
            theta = src.narrow(0, lo, size)
            direction = kernels.gaussian(size, key, start + lo, out.device)
            direction.mul_(theta.abs() <= threshold)
            kernels.apply_(out.narrow(0, lo, size), theta, beta=beta, alpha=alpha, dense=direction, offset=start + lo,
                           rounding_key=rounding_key)

    def scalars(self):
        return {"thresholds": self.thresholds}

    def load_scalars_(self, values):
        self.thresholds = {k: float(v) for k, v in values.get("thresholds", {}).items()}


def magnitude_thresholds(shards: list, sparsity: float) -> dict[str, float]:
    """τ_p for every shard's parameter: its k-th smallest |θ| over all ranks, k = ⌈(1 − s)·numel⌉.

    Collective: every rank calls it with its shards of the same parameters.
    """
    wanted = [max(1, math.ceil((1.0 - sparsity) * shard.numel)) for shard in shards]
    low, high = [0] * len(shards), [FLOAT_BITS_INF] * len(shards)
    for _ in range(32):  # the interval of bit patterns halves each round: 2^31 → 1
        middle = [(lo + hi) // 2 for lo, hi in zip(low, high)]
        counts = sum_over_ranks(*(_count_at_most(shard, bits) for shard, bits in zip(shards, middle)))
        for i, count in enumerate(counts):
            if count >= wanted[i]:
                high[i] = middle[i]
            else:
                low[i] = middle[i] + 1
    as_float = torch.tensor(high, dtype=torch.int64).to(torch.int32).view(torch.float32)
    return {shard.name: float(value) for shard, value in zip(shards, as_float.tolist())}


def _count_at_most(shard, bits: int) -> float:
    """How many of this rank's elements of ``shard`` have |θ| with bit pattern <= ``bits``."""
    count = 0
    with shard.swapped_in() as local:
        for lo in range(0, local.numel(), CHUNK_ELEMENTS):
            magnitude = local.narrow(0, lo, min(CHUNK_ELEMENTS, local.numel() - lo)).float().abs()
            count += int((magnitude.view(torch.int32) <= bits).sum())
    return float(count)


register_method(MethodSpec(
    name="sparse_mezo",
    title="S-MeZO",
    summary="the Gaussian direction on each parameter's small-magnitude weights only (S-MeZO)",
    options=SparseMeZOOptions,
    direction=lambda options, seed, frozen_parameters: SparseDirection(seed, options.sparsity, options.mask_interval),
    updates=("sgd",),  # the mask is a function of the current θ, which a momentum state would outlive
    fusable=False,  # the mask reads θ, which the fused pass's side paths do not see
    multi_query=False,
    direction_settings=("sparsity", "mask_interval"),
    working_chunk_bytes=CHUNK_ELEMENTS * 4 * 2,  # a chunk of z and of its mask (θ's magnitudes)
))
