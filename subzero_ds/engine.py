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
from .checkpoint import MANIFEST, CheckpointError, latest_checkpoint, load_sharded, read_manifest, read_range
from .checkpoint import save_sharded
from .export import save_hf_weights
from .fused import FusedPass, half_losses
from .kernels import GENERATOR
from .loss import model_loss
from .optimizer import ZOOptimizer
from .shards import ParamShard

Batch = Mapping[str, Any]
# Settings a resumed run must share with the checkpoint: they (with the step) define every direction.
DIRECTION_SETTINGS = ("method", "seed", "rank", "subspace_interval", "reshape")
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass(frozen=True)
class StepResult:
    """What one ZO step measured (losses averaged over data-parallel ranks).

    Attributes:
        step: index of the step just taken (0 for the first).
        loss_pos: L(θ + εD) on the batch.
        loss_neg: L(θ − εD) on the batch.
        projected_grad: g = (loss_pos − loss_neg) / (2ε), the same on every rank.
        lr: the learning rate the update used.
        skipped: True if a loss was not finite and the weights were left exactly as before.
    """

    step: int
    loss_pos: float
    loss_neg: float
    projected_grad: float
    lr: float
    skipped: bool = False

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
        self, ds_engine: Any, config: SubZeroConfig, optimizer: ZOOptimizer, loss_fn: LossFn | None = None
    ) -> None:
        self.ds_engine = ds_engine
        self.config = config
        self.optimizer = optimizer
        self.loss_fn = loss_fn or model_loss
        self.fused_pass = FusedPass(self.module, optimizer.shards, optimizer.direction, config.eps) if config.fused else None
        self.global_step = 0
        self.consecutive_skips = 0

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
        """Learning rate of the next step."""
        return self.config.lr

    def step(self, batch: Batch) -> StepResult:
        """One ZO step on this rank's micro-batch ``batch``: two forward passes and one update.

        Returns:
            The step's :class:`StepResult`. A non-finite loss skips the update (weights unchanged).
        """
        step, lr, eps = self.global_step, self.lr, self.config.eps
        batch = to_device(batch, self.device)
        loss_pos, loss_neg = self._fused_losses(batch, step) if self.fused_pass else self._in_place_losses(batch, step)
        # Sync point: every rank needs the same g to apply the same update to its shard.
        loss_pos, loss_neg = mean_over_ranks(loss_pos, loss_neg)
        projected_grad = (loss_pos - loss_neg) / (2 * eps)
        skipped = not math.isfinite(projected_grad)
        if skipped:
            self._skip_update(step, loss_pos, loss_neg)
        else:
            self.consecutive_skips = 0
            self.optimizer.update_(step, projected_grad, lr)
        self._release_stale_copies()
        self.global_step += 1
        return StepResult(step, loss_pos, loss_neg, projected_grad, lr, skipped)

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
        state = {"seed": self.config.seed, "settings": self.config.model_dump(mode="json"),
                 "generator": GENERATOR, "consecutive_skips": self.consecutive_skips}
        return save_sharded(root, self.global_step, self.shards, state, dict(extra or {}), keep_last)

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
        ours = self.config.model_dump(mode="json")
        changed = [k for k in DIRECTION_SETTINGS if saved.get(k) != ours.get(k)]
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
        load_sharded(path, self.shards)
        with torch.no_grad():  # DeepSpeed never re-reads the shard of a parameter it keeps gathered
            for shard in self.shards:
                gathered = shard.gathered()
                if gathered is not None:
                    gathered.copy_(read_range(path, manifest, shard.name, 0, shard.numel).to(gathered.dtype))
        self.global_step = manifest.step
        self.consecutive_skips = int(manifest.state.get("consecutive_skips", 0))
        log(f"resumed from {path} at step {manifest.step} (written by {manifest.world_size} ranks)")
        return manifest.extra

    def _in_place_losses(self, batch: Batch, step: int) -> tuple[float, float]:
        """ℓ+, ℓ− from two forwards with the shards perturbed in place (restored exactly on a skip)."""
        self.optimizer.save_()
        self._perturb(step, +1.0)
        loss_pos = self._loss(batch)
        self._perturb(step, -1.0)
        loss_neg = self._loss(batch)
        return loss_pos, loss_neg

    def _fused_losses(self, batch: Batch, step: int) -> tuple[float, float]:
        """ℓ+, ℓ− from one forward over [batch; batch]; the shards are not touched."""
        self.module.eval()  # dropout off: both halves must see the same function
        with torch.no_grad():
            if self.loss_fn is model_loss and self.fused_pass.serves_language_model_loss(batch):
                return self.fused_pass.language_model_losses(batch, step)  # the LM head in chunks of rows
            with self.fused_pass.active(step):
                return half_losses(self.loss_fn, self.module, batch)

    def _skip_update(self, step: int, loss_pos: float, loss_neg: float) -> None:
        """Leave the weights exactly as before this step; stop after too many such steps in a row."""
        if self.optimizer.in_place:
            self.optimizer.restore_()
        self.consecutive_skips += 1
        limit = self.config.max_consecutive_skips
        log(f"step {step}: non-finite loss (ℓ+={loss_pos}, ℓ−={loss_neg}); update skipped, weights unchanged "
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

    def _perturb(self, step: int, sign: float) -> None:
        self.optimizer.perturb_(step, sign)
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

