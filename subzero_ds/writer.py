"""Writing directions into this rank's shards: θ ± εD for a probe, the method's update, θ back.

Every write is one generate-and-apply pass per shard on the shard's own device
(:func:`subzero_ds.kernels.apply_`): no direction is materialized beside it, and nothing crosses
between host and accelerator (a shard offloaded to the host is computed on the host). A write then
orders itself before ZeRO-3's next all-gather and releases any gathered copy of a parameter it did
not reach, so the next forward sees exactly what was written.

Exact restore: in-place probing first copies this rank's trainable shards into a :class:`Backup`
of the same dtype on the same device; θ ± εD are computed from it in fp32 and the update is written
from it, so a step with lr = 0 leaves every parameter bit-identical (no +ε, −2ε, +ε drift). Extra
memory: one copy of this rank's trainable shard in the parameter dtype (full fine-tuning: model
bytes / world size; PEFT: the adapter only). With ZeRO++ hpZ every write also reaches this rank's
range of the secondary copy that forwards gather from (:mod:`subzero_ds.zero.shards`), computed from
the same positions of the same direction, so the two copies stay bit-identical. In-place probes
then write only that copy, which is all forwards read: the backup holds its range (model bytes / K)
instead of the shard.
"""

from __future__ import annotations

from typing import Callable

import deepspeed
import torch

from .config import UpdateRounding
from .methods import ZOMethod
from .methods.base import StateTensor, UpdateStep, WriteRange
from .phases import phase
from .seeds import key_of
from .zero.shards import ParamShard, order_before_gathers


class Backup:
    """A copy of this rank's trainable shards in their dtype on their device: the θ that in-place
    probes perturb from and restore to, and that the update reads.

    Persistent ZeRO-3 parameters (small; DeepSpeed keeps them gathered) are backed up whole, so
    that their gathered copy can be written alongside the shard and no forward has to gather them
    again. Under hpZ forwards read only the secondary copy: its range is backed up instead of the
    shard, which probes then leave at θ (the update writes both).
    """

    def __init__(self, shards: list[ParamShard]) -> None:
        self.shards = shards
        self._persistent = [i for i, shard in enumerate(shards) if shard.is_persistent]  # fixed at engine init
        # On the shard's own device; sized from the partition size (an NVMe-swapped shard's local() is not readable here).
        self.local = {i: torch.empty(s.local_numel, dtype=s.dtype, device=s.device)  # none where probes leave it
                      for i, s in enumerate(shards) if _probes_write_shard(s)}
        self.secondary = {i: torch.empty_like(copy) for i, s in enumerate(shards)  # its hpZ secondary range's θ
                          if (copy := s.secondary()) is not None}
        self.whole: dict[int, torch.Tensor] = {}  # shard index -> full θ of a persistent ZeRO-3 parameter

    def save_(self) -> None:
        """Copy the current shards. Collective under ZeRO-3: the first time, a persistent parameter that is
        not gathered yet is gathered to back it up."""
        with phase("backup"), torch.no_grad():
            for index, shard in enumerate(self.shards):
                secondary = shard.secondary()
                if secondary is not None:
                    _copy_into(self.secondary, index, secondary)
                if _probes_write_shard(shard):
                    with shard.swapped_in() as local:
                        _copy_into(self.local, index, local)
                else:
                    self.local.pop(index, None)
            not_gathered = [self.shards[i].param for i in self._persistent if self.shards[i].gathered() is None]
            with deepspeed.zero.GatheredParameters(not_gathered):  # a no-op once they stay gathered
                self.whole = {i: self.shards[i].param.data.view(-1).clone() for i in self._persistent}


def _probes_write_shard(shard: ParamShard) -> bool:
    """Whether in-place probes write the shard itself: not where forwards read only hpZ's secondary copy (a
    persistent parameter is written through its gathered copy, into all three)."""
    return shard.secondary() is None or shard.is_persistent


def _copy_into(backups: dict[int, torch.Tensor], index: int, values: torch.Tensor) -> None:
    """``backups[index]`` ← a copy of ``values`` (on their device, in their dtype), allocated the first time."""
    if index in backups:
        backups[index].copy_(values)
    else:
        backups[index] = values.clone()


class ShardWriter:
    """Writes this rank's shards of the trainable parameters, and holds the method's state.

    Args:
        shards: this rank's trainable shards.
        method: the ZO method: its direction, estimator and update rule.
        eps: perturbation scale ε.
        update_rounding: how a bf16 parameter takes its update (stochastic: seeded by position).
        release_gathered: drops ZeRO-3's gathered copies (``empty_partition_cache``), called after a
            write that left one stale.
    """

    def __init__(self, shards: list[ParamShard], method: ZOMethod, eps: float,
                 update_rounding: UpdateRounding = UpdateRounding.NEAREST,
                 release_gathered: Callable[[], None] = lambda: None) -> None:
        self.shards, self.method, self.eps = shards, method, eps
        self.update_rounding = update_rounding
        self._release_gathered = release_gathered
        self.targets = [write_range(shard) for shard in shards]
        # hpZ: where each secondary range is written. The update rule keeps state for it too (a direction with
        # per-element state, HiZOO's, is refused under hpZ: config.hpz_state_problems).
        self.secondary_targets = [secondary_write_range(shard) for shard in shards]
        method.direction.allocate_(self.targets)
        method.update.allocate_([*self.targets, *filter(None, self.secondary_targets)])

    def perturb_(self, step: int, sign: float, query: int, theta: Backup) -> None:
        """Set each shard to θ + sign·ε·D_{step,query}, θ from ``theta`` (so probes can run in any order)."""
        direction = self.method.direction

        def perturb(target: WriteRange, out: torch.Tensor, src: torch.Tensor, start: int) -> None:
            direction.apply_(out, src, target.name, target.shape, step, start, beta=1.0, alpha=sign * self.eps,
                             query=query)

        with phase("perturb"):
            self._write_(perturb, theta, probe=True)

    def restore_(self, theta: Backup) -> None:
        """Put back exactly the θ of ``theta``."""
        with phase("restore"), torch.no_grad():
            for index, backup in theta.local.items():
                with self.shards[index].swapped_in() as local:  # an NVMe shard is written back on exit
                    local.copy_(backup)
            for index, backup in theta.secondary.items():
                self.shards[index].secondary().copy_(backup)
            for index, backup in theta.whole.items():
                gathered = self.shards[index].gathered()
                if gathered is not None:
                    gathered.copy_(backup)
            stale = any(s.gathered() is not None and i not in theta.whole for i, s in enumerate(self.shards))
            self._settle(stale)

    def update_(self, update: UpdateStep, theta: Backup | None) -> None:
        """θ ← the method's update rule applied to θ, read from ``theta`` (in-place probing left the
        shards perturbed) or, when None, from the shards themselves."""
        rule = self.method.update

        def apply_update(target: WriteRange, out: torch.Tensor, src: torch.Tensor, start: int) -> None:
            rule.write_(target, out, src, start, update, self._rounding_key(target, update.step))

        with phase("update"):
            self._write_(apply_update, theta)
            rule.end_()

    def state(self) -> list[StateTensor]:
        """The method's state tensors (direction and update rule), for checkpoints."""
        return [*self.method.direction.state(), *self.method.update.state()]

    def state_copies(self) -> list[StateTensor]:
        """The update rule's state of hpZ's secondary ranges: a checkpoint loads it, other ranks save it."""
        return self.method.update.copies()

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
            return key_of(self.method.direction.seed, "update rounding", step, target.name, target.shape)
        return None

    def _write_(self, writer: Callable[[WriteRange, torch.Tensor, torch.Tensor, int], None], theta: Backup | None,
                probe: bool = False) -> None:
        """Each shard ← ``writer(target, out, src, start)``: θ read from ``src``, written to ``out``.

        θ is ``theta``'s copy, or the shard itself when None. A persistent parameter is computed once,
        whole, into its gathered copy (from its whole backup, or from that copy itself), and its owned
        range copied into the shard (and its hpZ secondary range): the copies stay bit-identical however
        their devices compute. A gathered copy with no whole θ to write it from is left stale, and released.
        An hpZ secondary range is otherwise written like the shard, from its own θ; a ``probe`` leaves a
        shard with no backup in ``theta`` (forwards read only the secondary copy) at θ.
        """
        stale = False
        with torch.no_grad():
            for index, (shard, target) in enumerate(zip(self.shards, self.targets)):
                with shard.swapped_in() as local:  # an NVMe shard is written back on exit
                    gathered, secondary = shard.gathered(), shard.secondary()
                    source = gathered if theta is None else theta.whole.get(index)
                    if gathered is not None and source is not None:
                        writer(target, gathered, source, 0)
                        if not _same_storage(gathered, local):
                            local.copy_(gathered.narrow(0, shard.start, shard.local_numel))
                        if secondary is not None:
                            secondary.copy_(gathered.narrow(0, shard.secondary_start, secondary.numel()))
                        continue
                    stale |= gathered is not None
                    if theta is not None and index in theta.local:
                        writer(target, local, theta.local[index], shard.start)
                    elif theta is None or not probe:  # the update of a shard that probes left at θ: from itself
                        writer(target, local, local, shard.start)
                    if secondary is not None:
                        writer(self.secondary_targets[index], secondary,
                               secondary if theta is None else theta.secondary[index], shard.secondary_start)
        self._settle(stale)

    def _settle(self, stale: bool) -> None:
        """Order the writes before the next all-gather; drop gathered copies the write left stale."""
        order_before_gathers(self.shards)
        if stale:
            with phase("cache release"):
                self._release_gathered()


def write_range(shard: ParamShard) -> WriteRange:
    """Where the writer writes ``shard``'s parameter: the whole of a persistent one (into its gathered
    copy, on the parameter's device), else this rank's range on the shard's device."""
    if shard.is_persistent:
        return WriteRange(shard.name, shard.shape, 0, shard.numel, shard.param.device, shard.is_matrix, shard.dtype)
    return WriteRange(shard.name, shard.shape, shard.start, shard.end, shard.device, shard.is_matrix, shard.dtype)


def secondary_write_range(shard: ParamShard) -> WriteRange | None:
    """Where the writer writes ``shard``'s hpZ secondary range (None without one)."""
    if shard.secondary_end == shard.secondary_start:
        return None
    device = shard.param.ds_secondary_tensor.device if shard.param.ds_secondary_tensor is not None else shard.device
    return WriteRange(shard.name, shard.shape, shard.secondary_start, shard.secondary_end, device, shard.is_matrix,
                      shard.dtype, secondary=True)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if ``a`` and ``b`` share memory (1 rank: DeepSpeed's gathered copy may be the shard itself)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
