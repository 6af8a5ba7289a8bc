"""Zeroth-order optimizers over parameter shards.

A ZO method is one thing: how it draws the direction D_t of a parameter, slice by slice
(:class:`Direction`). :class:`ZOOptimizer` does the rest for every method: perturb the shards,
restore them exactly, and apply θ ← θ − η·(g·D_t + λ·θ), each rank on its own shards only.

Every write is one generate-and-apply pass over the shard on the shard's own device
(:func:`subzero_ds.kernels.apply_`): no direction is materialized beside it, and nothing crosses
between host and accelerator (a shard offloaded to the host is computed on the host).

Exact restore: before perturbing, the optimizer copies this rank's trainable shard into a
backup of the same dtype on the same device; θ ± εD are computed from the backup in fp32 and the
update is written from it, so a step with lr = 0 leaves every parameter bit-identical (no +ε,
−2ε, +ε drift). Extra memory: one copy of this rank's trainable shard in the parameter dtype (full
fine-tuning: model bytes / world size; PEFT: the adapter only); for SubZero, the bases U, Vᵀ and
one r×n μZVᵀ at a time.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import deepspeed
import torch

from . import kernels
from .config import Method, SubZeroConfig, UpdateRounding
from .perturbation import Subspace, draw_core, draw_subspace, key_of, near_square_shape
from .shards import ParamShard, order_before_gathers

RoundingKey = tuple[int, int] | None


class Direction(ABC):
    """How a ZO method draws D_t; a pure function of (seed, step, name, shape, position)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    @abstractmethod
    def apply_(self, out: torch.Tensor, src: torch.Tensor, name: str, shape: tuple[int, ...], step: int, start: int,
               beta: float, alpha: float, rounding_key: RoundingKey = None) -> None:
        """``out = round(beta·src + alpha·D_step[start : start + len(out)])`` for parameter ``name``.

        ``out`` and ``src`` are 1-D, of one dtype and device (``out`` may be ``src``); the direction
        is computed on that device, in fp32.
        """

    def apply_gaussian_(self, out: torch.Tensor, src: torch.Tensor, name: str, shape: tuple[int, ...], step: int,
                        start: int, beta: float, alpha: float, rounding_key: RoundingKey = None) -> None:
        """:meth:`apply_` with the i.i.d. N(0, 1) direction of ``name``."""
        key = key_of(self.seed, "gaussian", step, name, shape)
        kernels.apply_(out, src, beta=beta, alpha=alpha, key=key, offset=start, rounding_key=rounding_key)

    def full(self, name: str, shape: tuple[int, ...], step: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The whole fp32 D_step of ``name`` in its own shape, on ``device`` (the values of every slice)."""
        out = torch.empty(math.prod(shape), dtype=torch.float32, device=device)
        self.apply_(out, out, name, shape, step, 0, beta=0.0, alpha=1.0)
        return out.view(shape)

    def has_lowrank(self, shape: tuple[int, ...]) -> bool:
        """Whether :meth:`lowrank` gives factors for a parameter of this shape."""
        return False

    def lowrank(self, name: str, shape: tuple[int, ...], step: int, device: torch.device | str = "cpu") -> LowRank:
        """D_step as factors μ·U·Z·Vᵀ in the parameter's own shape, on ``device`` (only where :meth:`has_lowrank`)."""
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


class GaussianDirection(Direction):
    """MeZO: every element an independent N(0, 1)."""

    def apply_(self, out, src, name, shape, step, start, beta, alpha, rounding_key=None):
        self.apply_gaussian_(out, src, name, shape, step, start, beta, alpha, rounding_key)


class SubspaceDirection(Direction):
    """SubZero: D_t = μ·U·Z_t·Vᵀ with U, V redrawn once per window of ``interval`` steps.

    Non-matrix parameters (biases, norm weights) use the Gaussian direction.

    Args:
        seed: the run seed.
        rank: subspace rank r (capped at min(m, n)).
        interval: window length F; the subspace of step t belongs to window t // F.
        reshape: view each matrix as its near-square factor pair before building U, V.
    """

    def __init__(self, seed: int, rank: int, interval: int, reshape: bool) -> None:
        super().__init__(seed)
        self.rank, self.interval, self.reshape = rank, interval, reshape
        self._cache: dict[str, tuple[int, Subspace]] = {}  # name -> (window, subspace)
        # (name, device) -> (step, factors): a step's passes (perturb ±, update) share one μZ·Vᵀ.
        self._factors_of_step: dict[tuple[str, torch.device], tuple[int, LowRank]] = {}

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The m×n the subspace is built for: the matrix itself, or its near-square view."""
        return near_square_shape(*shape) if self.reshape else (shape[0], shape[1])

    def subspace(self, name: str, shape: tuple[int, ...], step: int) -> Subspace:
        """U, V of ``name`` for the window holding ``step`` (drawn once per window on the host, then cached)."""
        window = step // self.interval
        cached = self._cache.get(name)
        if cached is None or cached[0] != window:
            rows, cols = self.matrix_shape(shape)
            rank = min(self.rank, rows, cols)
            key = (self.seed, "subspace", window, name, shape, rows, cols, rank)
            cached = (window, draw_subspace(key, rows, cols, rank))
            self._cache[name] = cached
        return cached[1]

    def apply_(self, out, src, name, shape, step, start, beta, alpha, rounding_key=None):
        if len(shape) != 2:
            return self.apply_gaussian_(out, src, name, shape, step, start, beta, alpha, rounding_key)
        factors = self._factors(name, shape, step, out.device)
        kernels.apply_(out, src, beta=beta, alpha=alpha, offset=start, lowrank=(factors.u, factors.core_vt),
                       rounding_key=rounding_key)

    def has_lowrank(self, shape):
        return len(shape) == 2 and self.matrix_shape(shape) == tuple(shape)  # reshaped: low-rank only in its view

    def lowrank(self, name, shape, step, device="cpu"):
        if not self.has_lowrank(shape):
            return super().lowrank(name, shape, step, device)
        return self._factors(name, shape, step, device)

    def _factors(self, name: str, shape: tuple[int, ...], step: int, device: torch.device | str) -> LowRank:
        """U, μ·Z_step, Vᵀ and μ·Z_step·Vᵀ of ``name`` in its (possibly reshaped) matrix shape, on ``device``."""
        device = torch.device(device)
        cached = self._factors_of_step.get((name, device))
        if cached is not None and cached[0] == step:
            return cached[1]
        u, vt = self.subspace(name, shape, step).on(device)
        rank = u.shape[1]
        core = draw_core((self.seed, "core", step, name, shape), rank, device)
        core.mul_(math.sqrt(math.prod(shape)) / rank)  # μ: E‖D‖² = m·n, as for a full Gaussian
        factors = LowRank(u=u, core=core, vt=vt, core_vt=kernels.lowrank_core(core, vt))
        self._factors_of_step[name, device] = (step, factors)
        return factors


def make_direction(config: SubZeroConfig, reshape: bool) -> Direction:
    """The direction generator the config asks for."""
    if config.method is Method.MEZO:
        return GaussianDirection(config.seed)
    return SubspaceDirection(config.seed, config.rank, config.subspace_interval, reshape)


class ZOOptimizer:
    """Perturbs, restores and updates this rank's shards of the trainable parameters.

    Args:
        shards: this rank's trainable shards.
        direction: the ZO method's direction generator.
        eps: perturbation scale ε.
        weight_decay: λ, applied to matrices only.
        in_place: True to perturb the shards themselves (keeps a backup for exact restore); False for
            the fused ± pass, where only :meth:`update_` writes and no backup is needed.
        update_rounding: how a bf16 parameter takes its update (stochastic: seeded by position).
    """

    def __init__(self, shards: list[ParamShard], direction: Direction, eps: float, weight_decay: float,
                 in_place: bool = True, update_rounding: UpdateRounding = UpdateRounding.NEAREST) -> None:
        self.shards, self.direction = shards, direction
        self.eps, self.weight_decay = eps, weight_decay
        self.in_place = in_place
        self.update_rounding = update_rounding
        # On the shard's own device; sized from the partition size (an NVMe-swapped shard's local() is not readable here).
        self._backups = [torch.empty(shard.local_numel, dtype=shard.dtype, device=shard.device) if in_place else None
                         for shard in shards]
        self._persistent = [i for i, shard in enumerate(shards) if shard.is_persistent]  # fixed at engine init
        self._full_backups: dict[int, torch.Tensor] = {}  # shard index -> full θ of a persistent ZeRO-3 parameter

    def save_(self) -> None:
        """Copy the current shards into the backup (the θ every later write starts from).

        Persistent ZeRO-3 parameters (small; DeepSpeed keeps them gathered) also get a full
        backup, and their gathered copy is written alongside the shard, so no forward has to gather
        them again. Collective under ZeRO-3 (the first time, a persistent parameter that is not
        gathered yet is gathered to back it up).
        """
        if not self.in_place:
            raise RuntimeError("ZOOptimizer(in_place=False) never perturbs shards: there is nothing to save")
        for shard, backup in zip(self.shards, self._backups):
            with shard.swapped_in() as local:
                backup.copy_(local)
        not_gathered = [self.shards[i].param for i in self._persistent if self.shards[i].gathered() is None]
        with deepspeed.zero.GatheredParameters(not_gathered):  # a no-op once they stay gathered
            self._full_backups = {i: self.shards[i].param.data.view(-1).clone() for i in self._persistent}

    def has_stale_gathered_copies(self) -> bool:
        """True if a gathered copy exists that the writes do not reach (it must be released)."""
        if not self.in_place:
            return False  # update_ writes every gathered copy from itself
        return any(s.gathered() is not None and i not in self._full_backups for i, s in enumerate(self.shards))

    def perturb_(self, step: int, sign: float) -> None:
        """Set each shard to θ + sign·ε·D_step (θ from the backup, so signs can be taken in any order)."""
        self._write_(step, lambda shard: (1.0, sign * self.eps, None))

    def restore_(self) -> None:
        """Put back exactly the θ saved by :meth:`save_`."""
        with torch.no_grad():
            for shard, backup in zip(self.shards, self._backups):
                with shard.swapped_in() as local:  # an NVMe shard is written back on exit
                    local.copy_(backup)
            for index, backup in self._full_backups.items():
                gathered = self.shards[index].gathered()
                if gathered is not None:
                    gathered.copy_(backup)
        order_before_gathers(self.shards)

    def update_(self, step: int, projected_grad: float, lr: float) -> None:
        """θ ← θ − lr·(g·D_step + λ·θ), from the backup (in-place mode) or the shard itself (fused)."""

        def sgd(shard: ParamShard) -> tuple[float, float, tuple[int, int] | None]:
            decay = self.weight_decay if shard.is_matrix else 0.0
            return 1.0 - lr * decay, -lr * projected_grad, self._rounding_key(shard, step)

        self._write_(step, sgd)

    def _rounding_key(self, shard: ParamShard, step: int) -> tuple[int, int] | None:
        """Random bits for stochastic rounding of this update (bf16 only; fp32 rounds exactly enough)."""
        if self.update_rounding is UpdateRounding.STOCHASTIC and shard.dtype == torch.bfloat16:
            return key_of(self.direction.seed, "update rounding", step, shard.name, shard.shape)
        return None

    def _write_(self, step: int, coefficients) -> None:
        """Each shard ← round(beta·θ + alpha·D_step), (beta, alpha, rounding key) = ``coefficients(shard)``.

        θ is the backup in in-place mode, the shard itself otherwise. A persistent parameter is
        computed once, whole, into its gathered copy, and its owned range copied into the shard:
        the two stay bit-identical however their devices compute.
        """
        with torch.no_grad():
            for index, (shard, backup) in enumerate(zip(self.shards, self._backups)):
                beta, alpha, rounding_key = coefficients(shard)
                with shard.swapped_in() as local:  # an NVMe shard is written back on exit
                    gathered = shard.gathered()
                    source = gathered if not self.in_place else self._full_backups.get(index)
                    if gathered is not None and source is not None:
                        self.direction.apply_(gathered, source, shard.name, shard.shape, step, 0, beta, alpha,
                                              rounding_key)
                        if not _same_storage(gathered, local):
                            local.copy_(gathered.narrow(0, shard.start, shard.local_numel))
                    else:
                        self.direction.apply_(local, local if backup is None else backup, shard.name, shard.shape,
                                              step, shard.start, beta, alpha, rounding_key)
        order_before_gathers(self.shards)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if ``a`` and ``b`` share memory (1 rank: DeepSpeed's gathered copy may be the shard itself)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
