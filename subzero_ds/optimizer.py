"""Zeroth-order optimizers over parameter shards.

A ZO method's direction D_t (:mod:`subzero_ds.methods`) is generated slice by slice;
:class:`ZOOptimizer` does the rest for every method: perturb the shards, restore them exactly, and
apply the update, each rank on its own shards only.

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

import deepspeed
import torch

from typing import Callable

from .config import UpdateRounding
from .methods import ZOMethod
from .methods.base import Direction, LowRank, StateTensor, UpdateStep, WriteRange  # noqa: F401 - LowRank: fused.py's
from .methods.mezo import GaussianDirection  # noqa: F401 - re-exported for tests, until their imports move
from .methods.subzero import SubspaceDirection  # noqa: F401
from .seeds import key_of
from .zero.shards import ParamShard, order_before_gathers


class ZOOptimizer:
    """Perturbs, restores and updates this rank's shards of the trainable parameters.

    Args:
        shards: this rank's trainable shards.
        method: the ZO method: its direction, estimator and update rule.
        eps: perturbation scale ε.
        in_place: True to perturb the shards themselves (keeps a backup for exact restore); False for
            the fused ± pass, where only :meth:`update_` writes and no backup is needed.
        update_rounding: how a bf16 parameter takes its update (stochastic: seeded by position).
    """

    def __init__(self, shards: list[ParamShard], method: ZOMethod, eps: float, in_place: bool = True,
                 update_rounding: UpdateRounding = UpdateRounding.NEAREST) -> None:
        self.shards, self.method = shards, method
        self.eps = eps
        self.in_place = in_place
        self.update_rounding = update_rounding
        # On the shard's own device; sized from the partition size (an NVMe-swapped shard's local() is not readable here).
        self._backups = [torch.empty(shard.local_numel, dtype=shard.dtype, device=shard.device) if in_place else None
                         for shard in shards]
        self._persistent = [i for i, shard in enumerate(shards) if shard.is_persistent]  # fixed at engine init
        self._full_backups: dict[int, torch.Tensor] = {}  # shard index -> full θ of a persistent ZeRO-3 parameter
        self.targets = [write_range(shard) for shard in shards]
        method.direction.allocate_(self.targets)
        method.update.allocate_(self.targets)

    @property
    def direction(self) -> Direction:
        """The method's direction generator."""
        return self.method.direction

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

    def perturb_(self, step: int, sign: float, query: int = 0) -> None:
        """Set each shard to θ + sign·ε·D_{step,query} (θ from the backup, so probes can run in any order)."""
        direction = self.method.direction

        def perturb(target: WriteRange, out: torch.Tensor, src: torch.Tensor, start: int) -> None:
            direction.apply_(out, src, target.name, target.shape, step, start, beta=1.0, alpha=sign * self.eps,
                             query=query)

        self._write_(perturb)

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

    def update_(self, update: UpdateStep) -> None:
        """θ ← the method's update rule applied to θ (from the backup in in-place mode, the shard itself when fused)."""
        rule = self.method.update

        def apply_update(target: WriteRange, out: torch.Tensor, src: torch.Tensor, start: int) -> None:
            rule.write_(target, out, src, start, update, self._rounding_key(target, update.step))

        self._write_(apply_update)
        rule.end_()

    def state(self) -> list[StateTensor]:
        """The method's state tensors (direction and update rule), for checkpoints."""
        return [*self.method.direction.state(), *self.method.update.state()]

    def scalars(self) -> dict:
        """The method's JSON-serializable state, the same on every rank."""
        return {"direction": self.method.direction.scalars(), "update": self.method.update.scalars()}

    def load_scalars_(self, values: dict) -> None:
        """Restore what :meth:`scalars` returned."""
        self.method.direction.load_scalars_(values.get("direction", {}))
        self.method.update.load_scalars_(values.get("update", {}))

    def _rounding_key(self, target: WriteRange, step: int) -> tuple[int, int] | None:
        """Random bits for stochastic rounding of this update (bf16 only; fp32 rounds exactly enough)."""
        if self.update_rounding is UpdateRounding.STOCHASTIC and target.dtype == torch.bfloat16:
            return key_of(self.direction.seed, "update rounding", step, target.name, target.shape)
        return None

    def _write_(self, writer: Callable[[WriteRange, torch.Tensor, torch.Tensor, int], None]) -> None:
        """Each shard ← ``writer(target, out, src, start)``: θ read from ``src``, written to ``out``.

        θ is the backup in in-place mode, the shard itself otherwise. A persistent parameter is
        computed once, whole, into its gathered copy, and its owned range copied into the shard:
        the two stay bit-identical however their devices compute.
        """
        with torch.no_grad():
            for index, (shard, backup, target) in enumerate(zip(self.shards, self._backups, self.targets)):
                with shard.swapped_in() as local:  # an NVMe shard is written back on exit
                    gathered = shard.gathered()
                    source = gathered if not self.in_place else self._full_backups.get(index)
                    if gathered is not None and source is not None:
                        writer(target, gathered, source, 0)
                        if not _same_storage(gathered, local):
                            local.copy_(gathered.narrow(0, shard.start, shard.local_numel))
                    else:
                        writer(target, local, local if backup is None else backup, shard.start)
        order_before_gathers(self.shards)


def write_range(shard: ParamShard) -> WriteRange:
    """Where the optimizer writes ``shard``'s parameter: the whole of a persistent one (into its gathered
    copy, on the parameter's device), else this rank's range on the shard's device."""
    if shard.is_persistent:
        return WriteRange(shard.name, shard.shape, 0, shard.numel, shard.param.device, shard.is_matrix, shard.dtype)
    return WriteRange(shard.name, shard.shape, shard.start, shard.end, shard.device, shard.is_matrix, shard.dtype)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if ``a`` and ``b`` share memory (1 rank: DeepSpeed's gathered copy may be the shard itself)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
