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

from .config import Method, SubZeroConfig, UpdateRounding
from .methods.base import Direction, LowRank  # noqa: F401 - LowRank: fused.py's import, until it moves
from .methods.mezo import GaussianDirection
from .methods.subzero import SubspaceDirection
from .perturbation import key_of
from .shards import ParamShard, order_before_gathers


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
