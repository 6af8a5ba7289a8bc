"""The three choices a ZO method makes, each behind one small interface.

- :class:`Direction`: what D_t is (Gaussian, random subspace, masked, preconditioned), generated
  for any slice of a parameter as a pure function of (seed, step, query, name, shape, position);
- the estimator (``estimators.py``): which probes a step takes and how their losses become the
  projected gradient(s);
- :class:`UpdateRule` (``sgd.py``, ``momentum.py``, ``adam.py``): how g·D becomes Δθ, and the state
  it keeps, sharded exactly like the parameters (or in SubZero's r×r subspace coordinates,
  ``moments.py``).

Each method and each update rule lives in one file of this package and registers itself
(``registry.py``); :func:`subzero_ds.methods.build` assembles them from the ``"subzero"`` section.
Update rules share code by composition (``moments.py`` and the functions below), never by
inheriting an implementation.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


RoundingKey = tuple[int, int] | None


class Direction(ABC):
    """How a ZO method draws D_{t,j} (step t, query j); a pure function of (seed, t, j, name, shape, position)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    @abstractmethod
    def apply_(self, out: torch.Tensor, src: torch.Tensor, name: str, shape: tuple[int, ...], step: int, start: int,
               beta: float, alpha: float, rounding_key: RoundingKey = None, query: int = 0) -> None:
        """``out = round(beta·src + alpha·D_{step,query}[start : start + len(out)])`` for parameter ``name``.

        ``out`` and ``src`` are 1-D, of one dtype and device (``out`` may be ``src``); the direction
        is computed on that device, in fp32.
        """

    def apply_mean_(self, out: torch.Tensor, src: torch.Tensor, name: str, shape: tuple[int, ...], step: int,
                    start: int, grads: list[float], beta: float, alpha: float, rounding_key: RoundingKey = None) -> None:
        """``out = beta·src + alpha·(1/q)·Σ_j g_j·D_{step,j}`` over q = len(grads) queries: one :meth:`apply_`
        pass per query (each rounded to ``out``'s dtype); a direction that can sum them first overrides it."""
        for query, grad in enumerate(grads):
            self.apply_(out, src if query == 0 else out, name, shape, step, start, beta=beta if query == 0 else 1.0,
                        alpha=alpha * grad / len(grads), rounding_key=rounding_key, query=query)

    def full(self, name: str, shape: tuple[int, ...], step: int, device: torch.device | str = "cpu",
             query: int = 0) -> torch.Tensor:
        """The whole fp32 D_{step,query} of ``name`` in its own shape, on ``device`` (the values of every slice)."""
        out = torch.empty(math.prod(shape), dtype=torch.float32, device=device)
        self.apply_(out, out, name, shape, step, 0, beta=0.0, alpha=1.0, query=query)
        return out.view(shape)

    def has_lowrank(self, shape: tuple[int, ...]) -> bool:
        """Whether :meth:`lowrank` gives factors for a parameter of this shape."""
        return False

    def coordinate_state(self, target: WriteRange, kinds: tuple[str, ...]) -> Any | None:
        """Update-rule state of ``target`` in the direction's own coordinates (SubZero: r×r per matrix), or
        None where the direction has none (the rule then keeps state the size of the parameter).

        The state object has ``tensors`` (kind -> fp32 tensor), ``enter_window_(step)``,
        ``mean_coordinates(step, grads)``, ``window`` and ``updates``; the direction writes a step given in
        those coordinates with :meth:`apply_coordinates_`.
        """
        return None

    def apply_coordinates_(self, out: torch.Tensor, src: torch.Tensor, name: str, shape: tuple[int, ...], step: int,
                           start: int, coordinates: torch.Tensor, beta: float, alpha: float,
                           rounding_key: RoundingKey = None) -> None:
        """:meth:`apply_` with the direction given by its coordinates (only where :meth:`coordinate_state` gives state)."""
        raise ValueError(f"{type(self).__name__} has no coordinates for {name} {shape}")

    def allocate_(self, ranges: list[WriteRange]) -> None:
        """Create per-parameter state over these write ranges (directions that keep some)."""

    def begin_step_(self, step: int, shards: list[Any]) -> None:
        """Work before a step's first probe (collective: every rank calls it for the same step)."""

    def state(self) -> list[StateTensor]:
        """The direction's own state tensors (checkpoints save them and load into them)."""
        return []

    def scalars(self) -> dict[str, Any]:
        """The JSON-serializable rest of its state, the same on every rank."""
        return {}

    def load_scalars_(self, values: dict[str, Any]) -> None:
        """Restore what :meth:`scalars` returned."""

    def lowrank(self, name: str, shape: tuple[int, ...], step: int, device: torch.device | str = "cpu",
                query: int = 0) -> LowRank:
        """D_{step,query} as factors μ·U·Z·Vᵀ in the parameter's own shape, on ``device`` (only where :meth:`has_lowrank`)."""
        raise ValueError(f"{type(self).__name__} has no low-rank factors for {name} {shape}")


@dataclass(frozen=True)
class LowRank:
    """D = U · core · Vᵀ with ``core`` = μ·Z already scaled (U: m×r, core: r×r, Vᵀ: r×n, fp32, one device).

    ``core_vt`` = core · Vᵀ (r×n), made by the kernels in a fixed order of operations (the same bits
    on every device); D's element (i, j) is U[i] · core_vt[:, j].
    """

    u: torch.Tensor
    core: torch.Tensor
    vt: torch.Tensor
    core_vt: torch.Tensor

    @property
    def v(self) -> torch.Tensor:
        """V (n×r)."""
        return self.vt.T


@dataclass(frozen=True)
class UpdateStep:
    """What a step's probes measured, as an update rule needs it (the same on every rank).

    Attributes:
        step: the step index t.
        lr: η for this step.
        grads: g_j per query.
        losses: every probe's loss, averaged over micro-batches and ranks, in the estimator's order.
        eps: ε.
    """

    step: int
    lr: float
    grads: list[float]
    losses: list[float]
    eps: float


@dataclass(frozen=True)
class StateTensor:
    """One tensor of an update rule's (or direction's) state, for checkpoints.

    Attributes:
        name: ``<parameter>::<kind>``, unique in the model.
        tensor: this rank's values: a parameter-sized state covers the flat range
            [offset, offset + numel) of the parameter; a replicated one (SubZero's r×r
            coordinates) is whole on every rank (offset 0).
        shape: the full shape (the parameter's, or r×r).
        offset: the parameter position of ``tensor[0]``.
        replicated: whether every rank holds the whole tensor.
    """

    name: str
    tensor: torch.Tensor
    shape: tuple[int, ...]
    offset: int = 0
    replicated: bool = False


class WriteRange:
    """Where a parameter's writes land on this rank: its owned range, or the whole parameter when
    ZeRO-3 keeps it gathered (the writer then computes the whole and copies its range into the
    shard), or (``secondary``) its range of ZeRO++ hpZ's secondary copy. A parameter-sized state
    covers exactly this range; a secondary range's state repeats what other ranks save, so
    checkpoints load it but never save it."""

    def __init__(self, name: str, shape: tuple[int, ...], start: int, end: int, device: torch.device,
                 is_matrix: bool, dtype: torch.dtype = torch.float32, secondary: bool = False) -> None:
        self.name, self.shape, self.start, self.end, self.device = name, shape, start, end, device
        self.is_matrix, self.dtype, self.secondary = is_matrix, dtype, secondary

    @property
    def numel(self) -> int:
        return self.end - self.start

    def zeros(self) -> torch.Tensor:
        """An fp32 state tensor for this range, zero."""
        return torch.zeros(self.numel, dtype=torch.float32, device=self.device)


class UpdateRule(ABC):
    """How the step's g_j·D_{t,j} become Δθ, and the state that takes (ZO-SGD keeps none).

    Implementations share code through :func:`decay_factor`, :func:`mean_direction_` and
    :class:`~subzero_ds.methods.moments.Moments`, not through a base class.
    """

    def allocate_(self, ranges: list[WriteRange]) -> None:
        """Create the state for these parameters (called once, before the first step)."""

    @abstractmethod
    def write_(self, target: WriteRange, out: torch.Tensor, src: torch.Tensor, start: int, update: UpdateStep,
               rounding_key: RoundingKey) -> None:
        """``out`` ← the updated θ for the flat range [start, start + len(out)) of ``target``'s
        parameter, θ read from ``src`` (``out`` may be ``src``). Called once per parameter and write
        range per step: under hpZ also for the parameter's secondary range, after its own range."""

    def end_(self) -> None:
        """Called once after every parameter of a step was written (per-step counters advance here)."""

    def state(self) -> list[StateTensor]:
        """Every state tensor (checkpoints save them and load into them)."""
        return []

    def copies(self) -> list[StateTensor]:
        """The state of hpZ's secondary ranges: checkpoints load into it, never save it (other ranks do)."""
        return []

    def scalars(self) -> dict[str, Any]:
        """The JSON-serializable rest of the state (counters, windows), the same on every rank."""
        return {}

    def load_scalars_(self, values: dict[str, Any]) -> None:
        """Restore what :meth:`scalars` returned."""


def decay_factor(target: WriteRange, lr: float, weight_decay: float) -> float:
    """The factor 1 − ηλ an update keeps of θ (1 for biases and norms: λ applies to matrices only)."""
    return 1.0 - lr * (weight_decay if target.is_matrix else 0.0)


def mean_direction_(direction: Direction, out: torch.Tensor, target: WriteRange, start: int, update: UpdateStep,
                    beta: float = 0.0) -> torch.Tensor:
    """``out`` (fp32) ← beta·out + (1/q)·Σ_j g_j·D_{t,j} over [start, start + len(out)), q = len(update.grads)."""
    direction.apply_mean_(out, out, target.name, target.shape, update.step, start, update.grads, beta=beta, alpha=1.0)
    return out
