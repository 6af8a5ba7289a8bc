"""Zeroth-order optimizers over parameter shards.

A ZO method is one thing: how it draws the direction D_t of a parameter, slice by slice
(:class:`Direction`). :class:`ZOOptimizer` does the rest for every method: perturb the shards,
restore them exactly, and apply θ ← θ − η·(g·D_t + λ·θ), each rank on its own shards only.

Exact restore: before perturbing, the optimizer copies this rank's trainable shard into a
backup of the same dtype; θ ± εD are computed from the backup in fp32 and the update is written
from it, so a step with lr = 0 leaves every parameter bit-identical (no +ε, −2ε, +ε drift).
Extra memory: one copy of this rank's trainable shard in the parameter dtype (full fine-tuning:
model bytes / world size; PEFT: the adapter only), plus one fp32 chunk of the direction at a time.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator

import deepspeed
import torch

from .config import Method, SubZeroConfig
from .perturbation import Chunk, Subspace, collect, draw_core, draw_subspace, gaussian_chunks, lowrank_chunks
from .perturbation import near_square_shape
from .shards import ParamShard


class Direction(ABC):
    """How a ZO method draws D_t; a pure function of (seed, step, name, shape, position)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    @abstractmethod
    def chunks(self, name: str, shape: tuple[int, ...], step: int, start: int, end: int) -> Iterator[Chunk]:
        """fp32 pieces of D_step for ``name`` that tile the flat range [start, end)."""

    def gaussian(self, name: str, shape: tuple[int, ...], step: int, start: int, end: int) -> Iterator[Chunk]:
        numel = math.prod(shape)
        return gaussian_chunks((self.seed, "gaussian", step, name, shape), numel, start, end)

    def full(self, name: str, shape: tuple[int, ...], step: int) -> torch.Tensor:
        """The whole fp32 D_step of ``name`` in its own shape (bit-identical to the chunks)."""
        numel = math.prod(shape)
        return collect(self.chunks(name, shape, step, 0, numel), 0, numel).view(shape)

    def has_lowrank(self, shape: tuple[int, ...]) -> bool:
        """Whether :meth:`lowrank` gives factors for a parameter of this shape."""
        return False

    def lowrank(self, name: str, shape: tuple[int, ...], step: int) -> LowRank:
        """D_step as factors μ·U·Z·Vᵀ in the parameter's own shape (only where :meth:`has_lowrank`)."""
        raise ValueError(f"{type(self).__name__} has no low-rank factors for {name} {shape}")


@dataclass(frozen=True)
class LowRank:
    """D = U · core · Vᵀ with ``core`` = μ·Z already scaled (U: m×r, core: r×r, V: n×r, fp32)."""

    u: torch.Tensor
    core: torch.Tensor
    v: torch.Tensor


class GaussianDirection(Direction):
    """MeZO: every element an independent N(0, 1)."""

    def chunks(self, name, shape, step, start, end):
        return self.gaussian(name, shape, step, start, end)


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

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The m×n the subspace is built for: the matrix itself, or its near-square view."""
        return near_square_shape(*shape) if self.reshape else (shape[0], shape[1])

    def subspace(self, name: str, shape: tuple[int, ...], step: int) -> Subspace:
        """U, V of ``name`` for the window holding ``step`` (drawn once per window, then cached)."""
        window = step // self.interval
        cached = self._cache.get(name)
        if cached is None or cached[0] != window:
            rows, cols = self.matrix_shape(shape)
            rank = min(self.rank, rows, cols)
            key = (self.seed, "subspace", window, name, shape, rows, cols, rank)
            cached = (window, draw_subspace(key, rows, cols, rank))
            self._cache[name] = cached
        return cached[1]

    def chunks(self, name, shape, step, start, end):
        if len(shape) != 2:
            return self.gaussian(name, shape, step, start, end)
        subspace, core, scale = self._factors(name, shape, step)
        return lowrank_chunks(subspace, core, scale, start, end)

    def has_lowrank(self, shape):
        return len(shape) == 2 and self.matrix_shape(shape) == tuple(shape)  # reshaped: low-rank only in its view

    def lowrank(self, name, shape, step):
        if not self.has_lowrank(shape):
            return super().lowrank(name, shape, step)
        subspace, core, scale = self._factors(name, shape, step)
        return LowRank(u=subspace.u, core=scale * core, v=subspace.v)

    def _factors(self, name: str, shape: tuple[int, ...], step: int) -> tuple[Subspace, torch.Tensor, float]:
        subspace = self.subspace(name, shape, step)
        rank = subspace.u.shape[1]
        core = draw_core((self.seed, "core", step, name, shape), rank)
        scale = math.sqrt(math.prod(shape)) / rank  # μ: E‖D‖² = m·n, as for a full Gaussian
        return subspace, core, scale


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
    """

    def __init__(self, shards: list[ParamShard], direction: Direction, eps: float, weight_decay: float,
                 in_place: bool = True) -> None:
        self.shards, self.direction = shards, direction
        self.eps, self.weight_decay = eps, weight_decay
        self.in_place = in_place
        # Sized from the partition size: an NVMe-swapped shard's local() is not readable here.
        self._backups = [torch.empty(shard.local_numel, dtype=shard.dtype) if in_place else None for shard in shards]
        self._persistent = [i for i, shard in enumerate(shards) if shard.is_persistent]  # fixed at engine init
        self._full_backups: dict[int, torch.Tensor] = {}  # shard index -> full θ of a persistent ZeRO-3 parameter

    def save_(self) -> None:
        """Copy the current shards into the backup (the θ every later write starts from).

        Persistent ZeRO-3 parameters (small; DeepSpeed keeps them gathered) also get a full
        backup, and their gathered copy is written with the full direction alongside the shard,
        so no forward has to gather them again. Collective under ZeRO-3 (the first time, a
        persistent parameter that is not gathered yet is gathered to back it up).
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
        scale = sign * self.eps
        self._write_(step, lambda theta, d, shard: theta.add_(d, alpha=scale))

    def restore_(self) -> None:
        """Put back exactly the θ saved by :meth:`save_`."""
        for shard, backup in zip(self.shards, self._backups):
            with shard.swapped_in() as local:  # an NVMe shard is written back on exit
                local.copy_(backup)
        for index, backup in self._full_backups.items():
            gathered = self.shards[index].gathered()
            if gathered is not None:
                gathered.copy_(backup)

    def update_(self, step: int, projected_grad: float, lr: float) -> None:
        """θ ← θ − lr·(g·D_step + λ·θ), from the backup (in-place mode) or the shard itself (fused)."""

        def sgd(theta: torch.Tensor, d: torch.Tensor, shard: ParamShard) -> torch.Tensor:
            decay = self.weight_decay if shard.is_matrix else 0.0
            return theta.mul_(1.0 - lr * decay).sub_(d, alpha=lr * projected_grad)

        self._write_(step, sgd)

    def _write_(self, step: int, combine: Callable[[torch.Tensor, torch.Tensor, ParamShard], torch.Tensor]) -> None:
        with torch.no_grad():
            for index, (shard, backup) in enumerate(zip(self.shards, self._backups)):
                with shard.swapped_in() as local:  # an NVMe shard is written back on exit
                    self._write_range_(step, combine, shard, local, local if backup is None else backup,
                                       shard.start, shard.end)
                    gathered = shard.gathered()
                    source = gathered if not self.in_place else self._full_backups.get(index)
                    if gathered is not None and source is not None and not _same_storage(gathered, local):
                        # Same elements, same arithmetic: bit-identical to what the shards now hold.
                        self._write_range_(step, combine, shard, gathered, source, 0, shard.numel)

    def _write_range_(self, step: int, combine: Callable[[torch.Tensor, torch.Tensor, ParamShard], torch.Tensor],
                      shard: ParamShard, target: torch.Tensor, backup: torch.Tensor, start: int, end: int) -> None:
        for lo, d in self.direction.chunks(shard.name, shard.shape, step, start, end):
            piece = slice(lo - start, lo - start + d.numel())
            theta = backup[piece].to(torch.float32, copy=True)
            target[piece] = combine(theta, d, shard)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if ``a`` and ``b`` share memory (1 rank: DeepSpeed's gathered copy may be the shard itself)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
