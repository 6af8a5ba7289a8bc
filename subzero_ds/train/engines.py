"""The engines the training loop drives: ZO (a SubZeroEngine) and first-order, behind one protocol.

The loop calls only what :class:`TrainingEngine` names; which engine a run gets is decided once, in
:func:`engine_config` and :func:`build_engine`, from ``--optimizer``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import torch
from torch import nn

import subzero_ds
from subzero_ds.config import DeepSpeedSettings, load_ds_config, parse
from subzero_ds.config.deepspeed import parse_deepspeed
from subzero_ds.config.errors import raise_problems
from subzero_ds.distributed import DEFAULT_COLLECTIVE_TIMEOUT
from subzero_ds.engine import StepResult, SubZeroEngine
from subzero_ds.loss import LossFn

from .args import TrainArgs
from .first_order import FirstOrderEngine, first_order_config
from .models import save_model

MetricsRow = dict[str, Any]
"""A step's fields of metrics.jsonl: ``loss`` and the engine's own (ZO: both probes, g; both: ``lr``)."""


class TrainingEngine(Protocol):
    """What the training loop needs from an engine (implemented by ZOEngine and FirstOrderEngine, no base class)."""

    description: str
    """How outputs name it: "ZO" or "first-order (adamw)"."""
    accumulation_steps: int
    """Micro-batches per step on each rank (DeepSpeed's ``gradient_accumulation_steps``)."""
    forwards_per_micro_batch: int
    """Forward passes a micro-batch costs on this rank (its ZO probes; first-order: 1 and its backward)."""
    batch_share: tuple[int, int]
    """(index, count): which equal share of each step's batch this rank takes (its rank and the world size,
    or, in perturbation mode, its index in its replica group and the group's size)."""

    @property
    def global_step(self) -> int:
        """Steps taken so far (after a resume: the checkpoint's)."""

    @property
    def module(self) -> nn.Module:
        """The wrapped model (what evaluation runs)."""

    @property
    def device(self) -> torch.device:
        """Where this rank's batches go."""

    @property
    def monitor(self) -> Any:
        """DeepSpeed's monitor (TensorBoard/CSV/W&B), enabled or not."""

    def step(self, batch: Mapping[str, Any]) -> MetricsRow:
        """One micro-batch; after the step's last, the update. Returns the step's metrics row."""

    def save_checkpoint(self, root: Path, extra: Mapping[str, Any], keep_last: int) -> Path:
        """A resumable checkpoint under ``root`` with the caller's ``extra`` state. Every rank calls it."""

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Continue from the checkpoint at ``path``; returns its ``extra`` state. Every rank calls it."""

    def checkpoint_bytes(self) -> int:
        """Bytes one checkpoint takes on disk, all ranks' files together (0: this engine writes none). Every rank calls it."""

    def save_model(self, path: Path) -> None:
        """The trained model (full weights, or the peft adapter) for ``from_pretrained``. Every rank calls it."""


class ZOEngine:
    """A :class:`~subzero_ds.engine.SubZeroEngine` as the loop drives it."""

    description = "ZO"

    def __init__(self, engine: SubZeroEngine) -> None:
        self.engine = engine
        self.accumulation_steps = engine.accumulation_steps
        self.forwards_per_micro_batch = sum(map(engine.replicas.evaluates, engine.method.estimator.probes()))
        self.batch_share = engine.replicas.batch_share()

    @property
    def global_step(self) -> int:
        return self.engine.global_step

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def monitor(self) -> Any:
        return self.engine.ds_engine.monitor

    def step(self, batch: Mapping[str, Any]) -> MetricsRow:
        return zo_metrics(self.engine.step(batch))

    def save_checkpoint(self, root: Path, extra: Mapping[str, Any], keep_last: int) -> Path:
        return self.engine.save_checkpoint(root, extra=extra, keep_last=keep_last)

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        return self.engine.load_checkpoint(path)

    def checkpoint_bytes(self) -> int:
        return self.engine.checkpoint_bytes()

    def save_model(self, path: Path) -> None:
        save_model(self.module, path)


def zo_metrics(result: StepResult) -> MetricsRow:
    """The metrics.jsonl fields of a ZO step: both probes' losses and g (each query's, with several)."""
    row = {"loss": result.loss, "loss_pos": result.loss_pos, "loss_neg": result.loss_neg,
           "projected_grad": result.projected_grad, "lr": result.lr, "skipped": result.skipped}
    if result.loss_clean is not None:
        row["loss_clean"] = result.loss_clean
    if len(result.projected_grads) > 1:
        row["projected_grads"] = list(result.projected_grads)
    return row


@dataclass(frozen=True)
class EngineConfig:
    """The DeepSpeed config a run's engine is built from, and its parsed settings."""

    source: str | Mapping[str, Any]  # --deepspeed_config, or the built-in default
    ds_config: dict[str, Any]  # first-order: with its optimizer block, without our section
    settings: DeepSpeedSettings
    collective_timeout: float  # the "subzero" section's (first-order runs: the default)


def engine_config(train: TrainArgs) -> EngineConfig:
    """The run's DeepSpeed config, parsed before anything is loaded.

    Raises:
        ConfigError: every problem of the config (a first-order one: also an optimizer block that
            contradicts --optimizer).
    """
    ds_config = load_ds_config(train.config_source)
    if not train.first_order:
        zo_settings, settings = parse(ds_config, train.config_name)
        return EngineConfig(train.config_source, ds_config, settings, zo_settings.collective_timeout)
    ds_config = first_order_config(ds_config, train.optimizer, train.learning_rate, 0.0)
    settings, problems = parse_deepspeed(ds_config, zeroth_order=False)
    raise_problems(problems, train.config_name)
    return EngineConfig(train.config_source, ds_config, settings, DEFAULT_COLLECTIVE_TIMEOUT)


def build_engine(train: TrainArgs, config: EngineConfig, model: nn.Module, loss_fn: LossFn,
                 per_device: int) -> TrainingEngine:
    """Wrap ``model`` in the engine --optimizer names (ZeRO-3: while the HfDeepSpeedConfig is alive)."""
    if train.first_order:
        ds_config = {**config.ds_config, "train_micro_batch_size_per_gpu": per_device}
        return FirstOrderEngine(model, ds_config, loss_fn, train.optimizer)
    return ZOEngine(subzero_ds.initialize(model=model, config=config.source, loss_fn=loss_fn))
