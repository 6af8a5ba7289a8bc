"""SubZeroEngine: zeroth-order training steps around a DeepSpeed (ZeRO-0/3) engine."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .config import SubZeroConfig
from .distributed import log, mean_over_ranks
from .checkpoint.sharded import MANIFEST, CheckpointError, latest_checkpoint, load_sharded, read_manifest, read_range
from .checkpoint.sharded import save_sharded
from .checkpoint.export import save_hf_weights
from .fused import FusedPass, half_losses
from .kernels import GENERATOR
from .loss import model_loss
from .methods import Estimator
from .methods.base import UpdateStep
from .optimizer import ZOOptimizer
from .zero.shards import ParamShard

Batch = Mapping[str, Any]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


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
    collective the optimizer adds is one all-reduce of (ℓ+, ℓ−) per step.

    Args:
        ds_engine: the DeepSpeed engine wrapping the model (no DeepSpeed optimizer).
        config: the validated ``"subzero"`` settings.
        optimizer: the ZO optimizer over this rank's shards.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default: ``model(**batch).loss``
            (language-model losses computed from the logits in chunks, see :mod:`subzero_ds.loss`).
    """

    def __init__(
        self, ds_engine: Any, config: SubZeroConfig, optimizer: ZOOptimizer, loss_fn: LossFn | None = None,
        accumulation_steps: int = 1,
    ) -> None:
        self.ds_engine = ds_engine
        self.config = config
        self.optimizer = optimizer
        self.loss_fn = loss_fn or model_loss
        self.fused_pass = FusedPass(self.module, optimizer.shards, optimizer.direction, config.eps) if config.fused else None
        self.accumulation_steps = accumulation_steps
        self.learning_rate = config.lr  # a schedule (e.g. the HF Trainer's) may change it between steps
        self.global_step = 0
        self.consecutive_skips = 0
        self._micro_batch = 0  # micro-batches of the current step done so far
        self._loss_sums: list[float] = []  # per probe, summed over those micro-batches

    @property
    def module(self) -> nn.Module:
        """The wrapped model (parameters partitioned under ZeRO-3)."""
        return self.ds_engine.module

    @property
    def device(self) -> torch.device:
        """This rank's accelerator (the host on CPU-only machines): batches and losses live there."""
        return torch.device(self.ds_engine.device)

    @property
    def shards(self) -> list[ParamShard]:
        """This rank's shards of the trainable parameters."""
        return self.optimizer.shards

    @property
    def lr(self) -> float:
        """Learning rate of the next step: ``subzero.lr``, unless a schedule set :attr:`learning_rate`."""
        return self.learning_rate

    @property
    def estimator(self) -> Estimator:
        """Which probes a step takes (the method's estimator)."""
        return self.optimizer.method.estimator

    def step(self, batch: Batch) -> StepResult:
        """The method's probes on this rank's micro-batch ``batch``; after the step's last micro-batch
        (DeepSpeed's ``gradient_accumulation_steps``), the update.

        With k micro-batches per step call this k times; every probe's loss is averaged over them
        (and over ranks) before the update, so k micro-batches of b rows act as one of k·b.

        Returns:
            The :class:`StepResult`. A non-finite loss skips the update (weights unchanged).
        """
        step = self.global_step
        batch = to_device(batch, self.device)
        if self._micro_batch == 0:
            self.optimizer.direction.begin_step_(step, self.shards)  # collective (S-MeZO's thresholds)
        losses = self._fused_losses(batch, step) if self.fused_pass else self._in_place_losses(batch, step)
        self._loss_sums = [a + b for a, b in zip(self._loss_sums, losses)] if self._micro_batch else losses
        self._micro_batch += 1
        if self._micro_batch < self.accumulation_steps:
            return self._result(step, losses, updated=False)
        # Sync point: every rank needs the same g to apply the same update to its shard.
        losses = mean_over_ranks(*(total / self.accumulation_steps for total in self._loss_sums))
        self._micro_batch, self._loss_sums = 0, []
        grads = self.estimator.projected_grads(losses, self.config.eps)
        result = self._result(step, losses, skipped=not all(map(math.isfinite, losses)))
        if result.skipped:
            self._skip_update(step, losses)
        else:
            self.consecutive_skips = 0
            self.optimizer.update_(UpdateStep(step, self.lr, grads, losses, self.config.eps))
        self._release_stale_copies()
        self.global_step += 1
        return result

    def _result(self, step: int, losses: list[float], updated: bool = True, skipped: bool = False) -> StepResult:
        """A :class:`StepResult` from the losses of :meth:`Estimator.probes`, in that order."""
        probes = self.estimator.probes()
        positive = [loss for probe, loss in zip(probes, losses) if probe.sign > 0]
        negative = [loss for probe, loss in zip(probes, losses) if probe.sign < 0]
        clean = next((loss for probe, loss in zip(probes, losses) if probe.sign == 0), None)
        grads = tuple(self.estimator.projected_grads(losses, self.config.eps))
        return StepResult(step, sum(positive) / len(positive), sum(negative) / len(negative), sum(grads) / len(grads),
                          self.lr, skipped, updated, grads, clean)

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
        if self._micro_batch:
            raise RuntimeError(f"save_checkpoint after {self._micro_batch} of the step's {self.accumulation_steps} "
                               "micro-batches: save between steps (after the step's last micro-batch).")
        state = {"seed": self.config.seed, "settings": self.config.flat(),
                 "generator": GENERATOR, "consecutive_skips": self.consecutive_skips,
                 "method": self.optimizer.scalars()}
        return save_sharded(root, self.global_step, self.shards, state, dict(extra or {}), keep_last,
                            self.optimizer.state())

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
        saved = manifest.state["settings"]
        ours = self.config.direction_settings()
        changed = [k for k in ours if saved.get(k) != ours[k]]
        if changed:
            raise CheckpointError(
                f"the checkpoint {path} was written with " + ", ".join(f"subzero.{k}={saved.get(k)!r}" for k in changed)
                + " but this run has " + ", ".join(f"{ours.get(k)!r}" for k in changed) + ": those settings define "
                "every direction, so the resumed run would not continue the same trajectory. Use the same values."
            )
        if manifest.state.get("generator") != GENERATOR:
            raise CheckpointError(
                f"the checkpoint {path} was written with the direction generator "
                f"{manifest.state.get('generator', 'of subzero_ds before 0.2 (per-block torch.Generator)')!r}, "
                f"but this version draws directions with {GENERATOR!r}: the resumed run would follow other "
                "directions. Resume with the subzero_ds version that wrote it, or export it "
                "(`subzero-export`) and start a new run from the exported weights."
            )
        load_sharded(path, self.shards, self.optimizer.state())
        self.optimizer.load_scalars_(manifest.state.get("method", {}))
        with torch.no_grad():  # DeepSpeed never re-reads the shard of a parameter it keeps gathered
            for shard in self.shards:
                gathered = shard.gathered()
                if gathered is not None:
                    gathered.copy_(read_range(path, manifest, shard.name, 0, shard.numel).to(gathered.dtype))
        self.global_step = manifest.step
        self.consecutive_skips = int(manifest.state.get("consecutive_skips", 0))
        log(f"resumed from {path} at step {manifest.step} (written by {manifest.world_size} ranks)")
        return manifest.extra

    def _in_place_losses(self, batch: Batch, step: int) -> list[float]:
        """Every probe's loss, with the shards perturbed in place (θ from the backup each time).

        The backup is taken at the step's first micro-batch (θ does not change before the update);
        after a micro-batch that is not the step's last, θ is restored, so the weights are never left
        perturbed between calls.
        """
        if self._micro_batch == 0:
            self.optimizer.save_()
        losses, perturbed = [], False
        for probe in self.estimator.probes():
            if probe.sign:
                self._perturb(step, probe.sign, probe.query)
                perturbed = True
            elif perturbed:
                self.optimizer.restore_()
                self._release_stale_copies()
            losses.append(self._loss(batch))
        if self._micro_batch + 1 < self.accumulation_steps:
            self.optimizer.restore_()
            self._release_stale_copies()
        return losses

    def _fused_losses(self, batch: Batch, step: int) -> list[float]:
        """Every probe's loss: each query's ℓ+, ℓ− from one forward over [batch; batch]; the shards are not touched."""
        self.module.eval()  # dropout off: both halves must see the same function
        losses = []
        with torch.no_grad():
            for probe in self.estimator.probes():
                if probe.sign == 0:
                    losses.append(self._loss(batch))
                elif probe.sign > 0:
                    if self.loss_fn is model_loss and self.fused_pass.serves_language_model_loss(batch):
                        losses.extend(self.fused_pass.language_model_losses(batch, step, probe.query))
                    else:
                        with self.fused_pass.active(step, query=probe.query):
                            losses.extend(half_losses(self.loss_fn, self.module, batch))
        return losses

    def _skip_update(self, step: int, losses: list[float]) -> None:
        """Leave the weights exactly as before this step; stop after too many such steps in a row."""
        if self.optimizer.in_place:
            self.optimizer.restore_()
        self.consecutive_skips += 1
        limit = self.config.max_consecutive_skips
        shown = ", ".join(f"{'ℓ0' if p.sign == 0 else ('ℓ+' if p.sign > 0 else 'ℓ−')}{p.query if self.estimator.queries > 1 else ''}"
                          f"={loss}" for p, loss in zip(self.estimator.probes(), losses))
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
        (loss,) = mean_over_ranks(self._loss(to_device(batch, self.device)))
        return loss

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write full Hugging Face weights to ``path`` (gathered; rank 0 writes). Call on every rank."""
        save_hf_weights(self.module, path)

    def _perturb(self, step: int, sign: float, query: int = 0) -> None:
        self.optimizer.perturb_(step, sign, query)
        self._release_stale_copies()

    def _loss(self, batch: Batch) -> float:
        self.module.eval()  # dropout off: both passes must see the same function
        with torch.no_grad():
            loss = self.loss_fn(self.module, batch)
        return float(loss.detach().float())

    def _release_stale_copies(self) -> None:
        """Drop gathered copies of edited ZeRO-3 parameters so the next forward sees the edit.

        The optimizer writes the gathered copies of persistent parameters itself; any other
        gathered copy of a trainable parameter would be stale after a write and is released.
        """
        if self.optimizer.has_stale_gathered_copies():
            self.ds_engine.optimizer.empty_partition_cache()


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

