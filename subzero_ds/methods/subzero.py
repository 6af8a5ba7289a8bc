"""SubZero (Yu et al. 2024, arXiv 2410.08989): D_t = μ·U·Z_t·Vᵀ in a lazily refreshed random subspace.

Everything SubZero-specific is here: its options, the near-square reshape, the bases U, V (drawn on
the host, one window at a time), the per-step core Z, the low-rank factors the fused pass uses, and
the r×r coordinates in which momentum and Adam keep their state (:class:`SubspaceState`).
Parameters that are not matrices (biases, norm weights) take MeZO's Gaussian direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

import torch
from pydantic import Field

from .. import kernels
from ..seeds import key_of, query_fields
from .base import Direction, LowRank, RoundingKey, WriteRange
from .mezo import apply_gaussian_
from .registry import MethodSpec, Options, register_method


class Reshape(str, Enum):
    """Whether SubZero views a matrix as its near-square factor pair before building U, V."""

    AUTO = "auto"  # on when the model has frozen parameters (PEFT), off for full fine-tuning
    ALWAYS = "always"
    NEVER = "never"

    def resolve(self, frozen_parameters: bool) -> bool:
        """Whether to reshape, for a model with (PEFT) or without frozen parameters."""
        return self is Reshape.ALWAYS or (self is Reshape.AUTO and frozen_parameters)


class StateOnRefresh(str, Enum):
    """What momentum/Adam state in subspace coordinates does when U, V are redrawn."""

    RESET = "reset"  # start from zero in the new subspace
    PROJECT = "project"  # carry over: M ← (U_newᵀ U_old) M (V_oldᵀ V_new)


class SubZeroOptions(Options):
    """SubZero's keys in the ``"subzero"`` section."""

    rank: int = Field(24, ge=1, description="Subspace rank r of SubZero, an integer >= 1 (8..64; 24 is common).")
    subspace_interval: int = Field(
        1000, ge=1, description="Steps F between subspace refreshes of SubZero, an integer >= 1 (1000 published).")
    reshape: Reshape = Field(
        Reshape.AUTO, strict=False, description='"auto" (on for PEFT, off for full FT), "always" or "never".')
    state_on_refresh: StateOnRefresh = Field(
        StateOnRefresh.RESET, strict=False,
        description='Momentum/Adam state at a subspace refresh: "reset" or "project" into the new subspace.')


@lru_cache(maxsize=4096)
def near_square_shape(m: int, n: int) -> tuple[int, int]:
    """The factor pair (m', n') of m·n with m' the largest divisor of m·n that is <= sqrt(m·n).

    An 8×5120 LoRA factor becomes 160×256; a 10×2048 prompt 128×160.
    """
    total = m * n
    for rows in range(math.isqrt(total), 0, -1):
        if total % rows == 0:
            return rows, total // rows
    return 1, total  # total == 0


def orthonormal_basis(key: tuple[int, int], rows: int, rank: int) -> torch.Tensor:
    """The Q factor (rows×rank, orthonormal columns, fp32, host) of the reduced QR of a seeded Gaussian.

    Computed on one thread: LAPACK's blocking may depend on the thread count, and every rank (and a
    rerun on another world size) must draw the same basis.
    """
    gaussian = kernels.gaussian(rows * rank, key).view(rows, rank)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, _ = torch.linalg.qr(gaussian, mode="reduced")
    finally:
        torch.set_num_threads(threads)
    return q.contiguous()


@dataclass
class Subspace:
    """The bases of one matrix for one window: ``u`` (m×r) and ``vt`` = Vᵀ (r×n), V with orthonormal columns.

    Drawn on the host; :meth:`on` gives (and keeps) a copy on each device that asks.
    """

    u: torch.Tensor
    vt: torch.Tensor

    def __post_init__(self) -> None:
        self._copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {self.u.device: (self.u, self.vt)}

    @property
    def v(self) -> torch.Tensor:
        """V (n×r)."""
        return self.vt.T

    def on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, Vᵀ) on ``device``, copied there once per window."""
        device = torch.device(device)
        if device not in self._copies:
            self._copies[device] = (self.u.to(device), self.vt.to(device))
        return self._copies[device]


def draw_subspace(key: tuple, rows: int, cols: int, rank: int) -> Subspace:
    """Draw U, V for a rows×cols matrix; ``key`` must include the window index t // F."""
    return Subspace(u=orthonormal_basis(key_of(*key, "U"), rows, rank),
                    vt=orthonormal_basis(key_of(*key, "V"), cols, rank).T.contiguous())


def draw_core(key: tuple, rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The per-step r×r core Z_t with N(0, 1) entries, generated directly on ``device``."""
    return kernels.gaussian(rank * rank, key_of(*key, "Z"), device=device).view(rank, rank)


class SubspaceDirection(Direction):
    """SubZero: D_t = μ·U·Z_t·Vᵀ with U, V redrawn once per window of ``interval`` steps.

    Non-matrix parameters (biases, norm weights) use the Gaussian direction.

    Args:
        seed: the run seed.
        rank: subspace rank r (capped at min(m, n)).
        interval: window length F; the subspace of step t belongs to window t // F.
        reshape: view each matrix as its near-square factor pair before building U, V.
        on_refresh: what update-rule state in subspace coordinates does when U, V are redrawn.
    """

    def __init__(self, seed: int, rank: int, interval: int, reshape: bool,
                 on_refresh: StateOnRefresh = StateOnRefresh.RESET) -> None:
        super().__init__(seed)
        self.rank, self.interval, self.reshape, self.on_refresh = rank, interval, reshape, on_refresh
        self._cache: dict[str, tuple[int, Subspace]] = {}  # name -> (window, subspace)
        # (name, device) -> ((step, query), factors): a step's passes (perturb ±, update) share one μZ·Vᵀ.
        self._factors_of_step: dict[tuple[str, torch.device], tuple[tuple[int, int], LowRank]] = {}

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The m×n the subspace is built for: the matrix itself, or its near-square view."""
        return near_square_shape(*shape) if self.reshape else (shape[0], shape[1])

    def subspace(self, name: str, shape: tuple[int, ...], step: int) -> Subspace:
        """U, V of ``name`` for the window holding ``step`` (drawn once per window on the host, then cached)."""
        window = step // self.interval
        cached = self._cache.get(name)
        if cached is None or cached[0] != window:
            cached = (window, self.draw_window(name, shape, window))
            self._cache[name] = cached
        return cached[1]

    def draw_window(self, name: str, shape: tuple[int, ...], window: int) -> Subspace:
        """U, V of ``name`` for ``window`` (the cached one if current, else drawn again, not cached)."""
        cached = self._cache.get(name)
        if cached is not None and cached[0] == window:
            return cached[1]
        rows, cols = self.matrix_shape(shape)
        rank = min(self.rank, rows, cols)
        return draw_subspace((self.seed, "subspace", window, name, shape, rows, cols, rank), rows, cols, rank)

    def apply_(self, out, src, name, shape, step, start, beta, alpha, rounding_key=None, query=0):
        if len(shape) != 2:
            return apply_gaussian_(out, src, self.seed, name, shape, step, start, beta, alpha, rounding_key, query)
        factors = self._factors(name, shape, step, out.device, query)
        kernels.apply_(out, src, beta=beta, alpha=alpha, offset=start, lowrank=(factors.u, factors.core_vt),
                       rounding_key=rounding_key)

    def apply_mean_(self, out, src, name, shape, step, start, grads, beta, alpha, rounding_key=None):
        """Several queries of a matrix share its window's U, V: Σ_j g_j·μ·U·Z_j·Vᵀ = μ·U·(Σ_j g_j·Z_j)·Vᵀ is one
        low-rank pass, whatever the number of queries (perturbation mode's R·q included)."""
        if len(shape) != 2 or len(grads) == 1:
            return super().apply_mean_(out, src, name, shape, step, start, grads, beta, alpha, rounding_key)
        coordinates = self.mean_z(name, shape, step, grads, out.device)
        self.apply_coordinates_(out, src, name, shape, step, start, coordinates, beta, alpha, rounding_key)

    def coordinate_state(self, target: WriteRange, kinds: tuple[str, ...]) -> SubspaceState | None:
        """r×r state for a matrix (its update rule's moments of g·Z); None for biases and norms."""
        if len(target.shape) != 2:
            return None
        return SubspaceState(self, target.name, target.shape, kinds, self.on_refresh is StateOnRefresh.PROJECT,
                             target.device)

    def apply_coordinates_(self, out: torch.Tensor, src: torch.Tensor, name: str, shape: tuple[int, ...], step: int,
                           start: int, coordinates: torch.Tensor, beta: float, alpha: float,
                           rounding_key: RoundingKey = None) -> None:
        """:meth:`apply_` with μ·U·C·Vᵀ for given r×r subspace coordinates C (fp32, ``out``'s device) in
        place of Z: how a subspace update rule (momentum, Adam) writes its step."""
        u, vt = self.subspace(name, shape, step).on(out.device)
        core_vt = kernels.lowrank_core((coordinates * self.scale(shape, u.shape[1])).contiguous(), vt)
        kernels.apply_(out, src, beta=beta, alpha=alpha, offset=start, lowrank=(u, core_vt), rounding_key=rounding_key)

    def z(self, name: str, shape: tuple[int, ...], step: int, device: torch.device | str = "cpu",
          query: int = 0) -> torch.Tensor:
        """Z_{step,query} (r×r, N(0, 1), unscaled): the direction's coordinates in the window's subspace."""
        rank = self.subspace(name, shape, step).u.shape[1]
        return draw_core((self.seed, "core", step, name, shape, *query_fields(query)), rank, device)

    def mean_z(self, name: str, shape: tuple[int, ...], step: int, grads: list[float],
               device: torch.device | str = "cpu") -> torch.Tensor:
        """(1/q)·Σ_j g_j·Z_{step,j} over q = len(grads) queries: the step's estimate in the subspace coordinates."""
        total = self.z(name, shape, step, device, 0).mul_(grads[0] / len(grads))
        for query, grad in enumerate(grads[1:], start=1):
            total.add_(self.z(name, shape, step, device, query), alpha=grad / len(grads))
        return total

    @staticmethod
    def scale(shape: tuple[int, ...], rank: int) -> float:
        """μ = sqrt(m·n) / r: E‖D‖² = m·n, as for a full Gaussian (MeZO's (η, ε) carry over)."""
        return math.sqrt(math.prod(shape)) / rank

    def has_lowrank(self, shape):
        return len(shape) == 2 and self.matrix_shape(shape) == tuple(shape)  # reshaped: low-rank only in its view

    def lowrank(self, name, shape, step, device="cpu", query=0):
        if not self.has_lowrank(shape):
            return super().lowrank(name, shape, step, device, query)
        return self._factors(name, shape, step, device, query)

    def _factors(self, name: str, shape: tuple[int, ...], step: int, device: torch.device | str,
                 query: int = 0) -> LowRank:
        """U, μ·Z, Vᵀ and μ·Z·Vᵀ of ``name`` for (step, query) in its (possibly reshaped) matrix shape, on ``device``."""
        device = torch.device(device)
        cached = self._factors_of_step.get((name, device))
        if cached is not None and cached[0] == (step, query):
            return cached[1]
        u, vt = self.subspace(name, shape, step).on(device)
        core = self.z(name, shape, step, device, query).mul_(self.scale(shape, u.shape[1]))
        factors = LowRank(u=u, core=core, vt=vt, core_vt=kernels.lowrank_core(core, vt))
        self._factors_of_step[name, device] = ((step, query), factors)
        return factors


class SubspaceState:
    """A matrix's update-rule state in SubZero's subspace coordinates: r×r tensors instead of m×n.

    The projected step of a query is g·Z (r×r); momentum and Adam keep their moments of it here and
    write μ·U·(…)·Vᵀ. When the window's U, V are redrawn the state is reset to zero, or carried over
    into the new subspace (``project``): M ← (U_newᵀ U_old) M (V_oldᵀ V_new), and second moments with
    the squared (elementwise) rotations, which keeps them non-negative.

    Args:
        direction: the SubZero direction whose subspace the coordinates refer to.
        name, shape: the matrix.
        kinds: the state tensors kept ("momentum"; "m", "v").
        project: carry over at a refresh instead of resetting.
        device: where the coordinates live (the shard's device).
    """

    def __init__(self, direction: SubspaceDirection, name: str, shape: tuple[int, ...], kinds: tuple[str, ...],
                 project: bool, device: torch.device) -> None:
        self.direction, self.name, self.shape, self.project = direction, name, shape, project
        rank = direction.subspace(name, shape, 0).u.shape[1]
        self.tensors = {kind: torch.zeros(rank, rank, dtype=torch.float32, device=device) for kind in kinds}
        self.window: int | None = None  # the window the coordinates refer to
        self.updates = 0  # updates since the last reset (Adam's bias correction)

    def mean_coordinates(self, step: int, grads: list[float]) -> torch.Tensor:
        """(1/q)·Σ_j g_j·Z_{step,j} on the state's device."""
        device = next(iter(self.tensors.values())).device
        return self.direction.mean_z(self.name, self.shape, step, grads, device)

    def enter_window_(self, step: int) -> None:
        """Bring the state into the subspace of ``step``'s window (reset or project), once per window."""
        window = step // self.direction.interval
        if self.window is not None and self.window != window:
            if self.project:
                self._project_(self.window, window)
            else:
                for tensor in self.tensors.values():
                    tensor.zero_()
                self.updates = 0
        self.window = window

    def _project_(self, old: int, new: int) -> None:
        before = self.direction.draw_window(self.name, self.shape, old)
        after = self.direction.draw_window(self.name, self.shape, new)
        # fp64 on the host, the same on every rank; then to the state's device.
        left = (after.u.double().T @ before.u.double()).float()
        right = (before.vt.double() @ after.vt.double().T).float()
        for kind, tensor in self.tensors.items():
            p, q = (left, right) if kind != "v" else (left.square(), right.square())
            tensor.copy_(p.to(tensor.device) @ tensor @ q.to(tensor.device))


def _state_on_refresh_needs_state(config) -> str | None:
    """``state_on_refresh`` concerns momentum/Adam state: with ZO-SGD there is none."""
    if "state_on_refresh" in config.options.model_fields_set and config.update == "sgd":
        return ("`subzero.state_on_refresh` is set, but it applies to `subzero.update` \"momentum\" or \"adam\" only "
                '(got "sgd"): remove it, or choose one of those update rules.')
    return None


register_method(MethodSpec(
    name="subzero",
    title="SubZero",
    summary="μ·U·Z·Vᵀ in a random rank-r subspace, redrawn every F steps (SubZero)",
    options=SubZeroOptions,
    direction=lambda options, seed, frozen_parameters: SubspaceDirection(
        seed, options.rank, options.subspace_interval, options.reshape.resolve(frozen_parameters),
        options.state_on_refresh),
    subspace_rank=lambda options: options.rank,
    direction_settings=("rank", "subspace_interval", "reshape"),
    rules=(_state_on_refresh_needs_state,),
))
