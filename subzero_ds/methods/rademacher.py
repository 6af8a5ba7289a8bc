"""Rademacher directions: MeZO with ±1 entries, the direction FZOO perturbs with (Dang et al., "FZOO: Fast
Zeroth-Order Optimizer for Fine-Tuning Large Language Models towards Adam-Scale Speed", ICLR 2026, arXiv
2506.09034). Only the direction: the estimator here is the two-point one of every method, not FZOO's
batched one-sided estimate normalized by the losses' standard deviation.

Every element of D_t is +1 or −1 with probability ½ each: E[D] = 0 and E[D·Dᵀ] = I as for MeZO's
Gaussian, so MeZO's (η, ε) carry over, and ‖D‖² is exactly the number of elements. Element i takes
the top bit of the same 32-bit Philox word that MeZO's key gives it (:func:`~.mezo.gaussian_key`;
lane i mod 4 of counter i div 4), where MeZO feeds that word to Box–Muller: a pure function of
(key, i), the same on every rank and device.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels import philox
from .base import Direction
from .mezo import gaussian_key
from .registry import MethodSpec, NoOptions, register_method

CHUNK_ELEMENTS = 1 << 22  # signs are made a chunk at a time


def signs(key: tuple[int, int], start: int, end: int, device: torch.device) -> torch.Tensor:
    """±1 (fp32) for elements [start, end) of the direction with ``key``."""
    words, lane = philox.counter_words(start, end, key, device)
    top = words.gather(0, lane.unsqueeze(0)).squeeze(0) >> 31
    return (1 - 2 * top).to(torch.float32)


class RademacherDirection(Direction):
    """±1 in every element."""

    def apply_(self, out, src, name, shape, step, start, beta, alpha, rounding_key=None, query=0):
        key = gaussian_key(self.seed, step, name, shape, query)
        for lo in range(0, out.numel(), CHUNK_ELEMENTS):
            size = min(CHUNK_ELEMENTS, out.numel() - lo)
            kernels.apply_(out.narrow(0, lo, size), src.narrow(0, lo, size), beta=beta, alpha=alpha,
                           dense=signs(key, start + lo, start + lo + size, out.device), offset=start + lo,
                           rounding_key=rounding_key)


register_method(MethodSpec(
    name="rademacher",
    title="Rademacher",
    summary="±1 in every element, from MeZO's key (FZOO's direction)",
    options=NoOptions,
    direction=lambda options, seed, frozen_parameters: RademacherDirection(seed),
))
