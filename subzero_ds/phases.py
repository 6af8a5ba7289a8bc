"""Named phases of a ZO step, for profilers and benchmarks.

Each phase is a ``torch.profiler.record_function`` range named ``subzero::<phase>`` (it shows in
any torch profiler trace) and, while a :func:`recorded` block is active, its wall time is added up
per name (synchronizing the GPU around it, so the time covers its kernels). Outside such a block a
phase costs one record_function range.

Phases: ``forward`` (a probe's forward pass and loss), ``backup`` (copying θ before in-place
probes), ``perturb``, ``restore``, ``update``, ``cache release`` (dropping ZeRO-3's stale gathered
copies) and ``all-reduce`` (the step's scalars).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

import torch

PHASES = ("forward", "backup", "perturb", "restore", "update", "cache release", "all-reduce")

_recorders: list[dict[str, float]] = []


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark the block as phase ``name`` (timed while :func:`recorded` is active)."""
    with torch.profiler.record_function(f"subzero::{name}"):
        if not _recorders:
            yield
            return
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            elapsed = time.perf_counter() - start
            for totals in _recorders:
                totals[name] += elapsed


@contextlib.contextmanager
def recorded() -> Iterator[dict[str, float]]:
    """Within the block, the seconds spent in each phase, added up by name (a nested phase counts in both)."""
    totals: dict[str, float] = defaultdict(float)
    _recorders.append(totals)
    try:
        yield totals
    finally:
        _recorders.remove(totals)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
