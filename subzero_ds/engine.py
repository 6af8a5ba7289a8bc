"""SubZeroEngine: zeroth-order training steps around a DeepSpeed (ZeRO-0/3) engine.

One step (:meth:`SubZeroEngine.step`), in the order it runs:

1. begin: the method's per-step work (S-MeZO's thresholds) and, in place, a backup of θ;
2. probes: every probe's loss on this rank's micro-batch (``probes.py``: in place or fused);
3. accumulate: average each probe's loss over the step's micro-batches (DeepSpeed's
   ``gradient_accumulation_steps``);
4. all-reduce: one all-reduce of those few scalars, so every rank has the same g;
5. update: the method's update rule writes each rank's own shards (``writer.py``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .checkpoint.compatibility import check_resumable
from .checkpoint.export import save_hf_weights
from .checkpoint.sharded import MANIFEST, latest_checkpoint, load_sharded, read_manifest, read_range, save_sharded
from .config import ReplicaMode, SubZeroConfig
from .distributed import get_world_size_and_rank, log, mean_over_ranks, sum_over_ranks
from .kernels import GENERATOR
from .loss import LossFn, forward_loss, model_loss
from .methods import ZOMethod
from .methods.base import UpdateStep
from .phases import phase
from .probes import FusedProbes, InPlaceProbes, Probes
from .writer import ShardWriter
from .zero.replicas import Replicas
from .zero.shards import ParamShard

Batch = Mapping[str, Any]


@dataclass(frozen=True)
class StepResult:
    """What one ZO step measured (losses averaged over its micro-batches and the data-parallel ranks).

    Attributes:
        step: index of the step (0 for the first).
        loss_pos: L(θ + εD) on the batch (the mean over queries).
        loss_neg: L(θ − εD) on the batch (the mean over queries).
        projected_grad: g = (loss_pos − loss_neg) / (2ε), the same on every rank (the mean over queries).
        lr: the learning rate the update used.
        skipped: True if a loss was not finite and the weights were left exactly as before.
        updated: False for a micro-batch before the last of a step (gradient accumulation): its
            losses are this micro-batch's, on this rank, and nothing was updated yet.
        projected_grads: g_j of every query.
        loss_clean: L(θ) when the method probes it (HiZOO), else None.
    """

    step: int
    loss_pos: float
    loss_neg: float
    projected_grad: float
    lr: float
    skipped: bool = False
    updated: bool = True
    projected_grads: tuple[float, ...] = ()
    loss_clean: float | None = None

    @property
    def loss(self) -> float:
        """The two-point loss estimate (ℓ+ + ℓ−) / 2."""
        return (self.loss_pos + self.loss_neg) / 2


class SubZeroEngine:
    """Zeroth-order fine-tuning of a DeepSpeed-wrapped model. Build it with :func:`subzero_ds.initialize`.

    Each rank perturbs and updates only its own shard of every trainable parameter; the only
    collective a step adds is one all-reduce of its probes' losses.

    Args:
        ds_engine: the DeepSpeed engine wrapping the model (no DeepSpeed optimizer).
        config: the validated ``"subzero"`` settings.
        method: the ZO method (direction, estimator, update rule) built for the model.
        shards: this rank's shards of the trainable parameters.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default: the model's own loss, a
            language-model loss scored inside the LM head (:mod:`subzero_ds.loss`).
        accumulation_steps: micro-batches per step on each rank.
        replicas: the replica groups and what they share (default: data parallel over every rank).
    """

    def __init__(self, ds_engine: Any, config: SubZeroConfig, method: ZOMethod, shards: list[ParamShard],
                 loss_fn: LossFn | None = None, accumulation_steps: int = 1, replicas: Replicas | None = None) -> None:
        self.ds_engine, self.config, self.method, self.shards = ds_engine, config, method, shards
        self.loss_fn = loss_fn or model_loss
        self.replicas = replicas or Replicas.of(ReplicaMode.DATA, 0, 1, *get_world_size_and_rank(), config.queries)
        self.writer = ShardWriter(shards, method, config.eps, config.update_rounding,
                                  release_gathered=lambda: ds_engine.optimizer.empty_partition_cache())
        self.probes: Probes = (
            FusedProbes(self.module, self.writer, method.estimator, config.eps, self.loss_fn, self.replicas)
            if config.fused else InPlaceProbes(self.module, self.writer, method.estimator, self.loss_fn, self.replicas))
        self.accumulation_steps = accumulation_steps
        self.learning_rate = config.lr  # a schedule (e.g. the HF Trainer's) may change it between steps
        self.global_step = 0
        self.consecutive_skips = 0
        self._micro_batches: list[list[float]] = []  # each probe's losses on the step's micro-batches so far

    @property
    def module(self) -> nn.Module:
        """The wrapped model (parameters partitioned under ZeRO-3)."""
        return self.ds_engine.module

    @property
    def device(self) -> torch.device:
        """This rank's accelerator (the host on CPU-only machines): batches and losses live there."""
        return torch.device(self.ds_engine.device)

    @property
    def lr(self) -> float:
        """Learning rate of the next step: ``subzero.lr``, unless a schedule set :attr:`learning_rate`."""
        return self.learning_rate

    def step(self, batch: Batch) -> StepResult:
        """The method's probes on this rank's micro-batch ``batch``; after the step's last micro-batch
        (DeepSpeed's ``gradient_accumulation_steps``), the update.

        With k micro-batches per step call this k times; every probe's loss is averaged over them
        (and over ranks) before the update, so k micro-batches of b rows act as one of k·b.

        Returns:
            The :class:`StepResult`. A non-finite loss skips the update (weights unchanged).
        """
        step, batch = self.global_step, to_device(batch, self.device)
        if not self._micro_batches:
            self.method.direction.begin_step_(step, self.shards)  # collective: S-MeZO's thresholds
            self.probes.begin_step_()  # in place: back θ up
        self._micro_batches.append(self.probes.losses(batch, step))
        if len(self._micro_batches) < self.accumulation_steps:
            self.probes.restore_()  # θ exactly as before until the update
            return self._result(step, self._micro_batches[-1], updated=False)
        losses = self._mean_over_micro_batches_and_ranks()  # sync point: every rank gets the same g
        result = self._result(step, losses)
        if result.skipped:
            self._skip_update(step, losses)  # weights exactly as before
        else:
            self.consecutive_skips = 0
            self.writer.update_(UpdateStep(step, self.lr, list(result.projected_grads), losses, self.config.eps),
                                self.probes.theta)
        self.global_step += 1
        return result

    def _direction_settings(self) -> dict[str, Any]:
        """What the trajectory depends on: the config's direction settings, with ``queries`` the directions per step
        over all replica groups (so a run resumes across replica modes that estimate the same directions)."""
        return {**self.config.direction_settings(), "queries": self.replicas.step_queries}

    def _mean_over_micro_batches_and_ranks(self) -> list[float]:
        """Each probe's loss averaged over the step's micro-batches, then over the ranks that measured it
        (all of them, or its replica group's): one all-reduce."""
        means = [sum(column) / len(column) for column in zip(*self._micro_batches)]
        self._micro_batches = []
        with phase("all-reduce"):
            sums = sum_over_ranks(*means)
        return [total / self.replicas.contributors(probe)
                for total, probe in zip(sums, self.method.estimator.probes())]

    def _result(self, step: int, losses: list[float], updated: bool = True) -> StepResult:
        """A :class:`StepResult` from the losses of the estimator's probes, in their order."""
        estimator = self.method.estimator
        probes = estimator.probes()
        positive = [loss for probe, loss in zip(probes, losses) if probe.sign > 0]
        negative = [loss for probe, loss in zip(probes, losses) if probe.sign < 0]
        clean = next((loss for probe, loss in zip(probes, losses) if probe.sign == 0), None)
        grads = tuple(estimator.projected_grads(losses, self.config.eps))
        skipped = updated and not all(map(math.isfinite, losses))
        return StepResult(step, sum(positive) / len(positive), sum(negative) / len(negative), sum(grads) / len(grads),
                          self.lr, skipped, updated, grads, clean)

    def _skip_update(self, step: int, losses: list[float]) -> None:
        """Leave the weights exactly as before this step; stop after too many such steps in a row."""
        self.probes.restore_()
        self.consecutive_skips += 1
        limit = self.config.max_consecutive_skips
        queries = self.method.estimator.queries
        shown = ", ".join(f"{'ℓ0' if p.sign == 0 else ('ℓ+' if p.sign > 0 else 'ℓ−')}{p.query if queries > 1 else ''}"
                          f"={loss}" for p, loss in zip(self.method.estimator.probes(), losses))
        log(f"step {step}: non-finite loss ({shown}); update skipped, weights unchanged "
            f"({self.consecutive_skips} in a row, limit {limit})")
        if self.consecutive_skips >= limit:
            raise NonFiniteLossError(
                f"{self.consecutive_skips} consecutive steps (up to step {step}) had a non-finite loss, so the run "
                f"stops (`subzero.max_consecutive_skips` = {limit}). The weights are those before the first of "
                "them. Lower `subzero.lr` or `subzero.eps`, check the data for empty or corrupt examples, or use "
                "fp32/bf16 instead of fp16."
            )

    def evaluate(self, batch: Batch) -> float:
        """Forward-only loss on this rank's ``batch``, averaged over data-parallel ranks."""
        (loss,) = mean_over_ranks(forward_loss(self.loss_fn, self.module, to_device(batch, self.device)))
        return loss

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write full Hugging Face weights to ``path`` (gathered; rank 0 writes). Call on every rank."""
        save_hf_weights(self.module, path)

    def save_checkpoint(self, root: str | os.PathLike, extra: Mapping[str, Any] | None = None,
                        keep_last: int | None = None) -> Path:
        """Write ``<root>/checkpoint-<global_step>`` atomically (each rank its shards). Call on every rank.

        Args:
            root: directory of checkpoints, shared by all ranks.
            extra: the caller's JSON-serializable state to restore with it (e.g. the data position).
            keep_last: keep only the newest ``keep_last`` checkpoints under ``root``.

        Returns:
            The checkpoint directory.
        """
        if self._micro_batches:
            raise RuntimeError(f"save_checkpoint after {len(self._micro_batches)} of the step's "
                               f"{self.accumulation_steps} micro-batches: save between steps (after the step's last "
                               "micro-batch).")
        state = {"seed": self.config.seed, "settings": {**self.config.flat(), **self._direction_settings()},
                 "generator": GENERATOR,
                 "consecutive_skips": self.consecutive_skips, "method": self.writer.scalars()}
        return save_sharded(root, self.global_step, self.shards, state, dict(extra or {}), keep_last,
                            self.writer.state())

    def checkpoint_bytes(self) -> int:
        """Bytes one checkpoint of this run holds: every rank's shards and method state. Call on every rank."""
        local = sum(s.local_numel * s.dtype.itemsize for s in self.shards)
        local += sum(e.tensor.numel() * e.tensor.element_size() for e in self.writer.state())
        (total,) = sum_over_ranks(float(local))
        return int(total)

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Continue from the checkpoint at ``path`` (a ``checkpoint-<step>`` directory, or a directory of
        them: the newest complete one). Any world size. Call on every rank.

        Returns:
            The ``extra`` state saved with it.

        Raises:
            CheckpointError: missing/corrupt checkpoint, another model, or settings that change the directions.
        """
        path = Path(path)
        if not (path / MANIFEST).is_file() and latest_checkpoint(path) is not None:
            path = latest_checkpoint(path)
        manifest = read_manifest(path)
        check_resumable(path, manifest, self._direction_settings())
        load_sharded(path, self.shards, [*self.writer.state(), *self.writer.state_copies()])
        self.writer.load_scalars_(manifest.state.get("method", {}))
        with torch.no_grad():  # DeepSpeed never re-reads the shard of a parameter it keeps gathered
            for shard in self.shards:
                gathered = shard.gathered()
                if gathered is not None:
                    gathered.copy_(read_range(path, manifest, shard.name, 0, shard.numel).to(gathered.dtype))
        self.global_step = manifest.step
        self.consecutive_skips = int(manifest.state.get("consecutive_skips", 0))
        log(f"resumed from {path} at step {manifest.step} (written by {manifest.world_size} ranks)")
        return manifest.extra


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (in dicts, lists and tuples, a tokenizer's BatchEncoding too) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class NonFiniteLossError(RuntimeError):
    """Too many consecutive ZO steps had a non-finite loss (``subzero.max_consecutive_skips``)."""
