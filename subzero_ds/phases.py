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
_NOTE = "in the ZO step's phase: "


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark the block as phase ``name`` (timed while :func:`recorded` is active).

    An exception leaving the block carries a note naming the innermost phase it left (:func:`phase_of`),
    so a fault's message can say where in the step it struck (a timed-out all-gather in ``forward``).
    """
    with torch.profiler.record_function(f"subzero::{name}"):
        try:
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
        except BaseException as error:
            if phase_of(error) is None:
                error.add_note(f"{_NOTE}{name}")
            raise


def phase_of(error: BaseException) -> str | None:
    """The innermost phase ``error`` was raised in, or None if it came from outside every phase."""
    return next((note.removeprefix(_NOTE) for note in getattr(error, "__notes__", ()) if note.startswith(_NOTE)), None)


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
