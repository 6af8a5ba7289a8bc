"""First-order baselines: plain DeepSpeed training with DeepSpeed's own optimizer, through our CLI.

The point is the comparison under identical conditions (same tasks, data order, evaluation and
outputs as the ZO runs), not a second trainer: the forward, backward, ZeRO gradient partitioning,
gradient accumulation and optimizer step are DeepSpeed's. The optimizer comes from the JSON's
``"optimizer"`` block, or, without one, from ``--optimizer adamw|sgd`` and ``--learning_rate``
(AdamW as torch's implementation, ``torch_adam``: no DeepSpeed op is compiled).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from subzero_ds.checkpoint.sharded import CheckpointError
from subzero_ds.config import SECTION, ConfigError
from subzero_ds.distributed import get_world_size_and_rank, mean_over_ranks
from subzero_ds.engine import to_device

from .models import save_model

OPTIMIZER_TYPES = {"adamw": "AdamW", "sgd": "SGD"}


def first_order_config(ds_config: Mapping[str, Any], optimizer: str, lr: float, weight_decay: float) -> dict[str, Any]:
    """The DeepSpeed config of a first-order run: the JSON's ``"optimizer"`` block, or one built for
    ``optimizer`` ("adamw" | "sgd"); our ``"subzero"`` section is dropped.

    Raises:
        ConfigError: the JSON's optimizer type does not match ``--optimizer``.
    """
    config = {k: copy.deepcopy(v) for k, v in ds_config.items() if k != SECTION}
    block = config.get("optimizer")
    wanted = OPTIMIZER_TYPES[optimizer]
    if block is None:
        params: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
        if wanted == "AdamW":
            params["torch_adam"] = True  # torch's AdamW: no DeepSpeed CUDA/CPU Adam op to compile
        config["optimizer"] = {"type": wanted, "params": params}
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    elif str(block.get("type", "")).lower() != wanted.lower():
        raise ConfigError(
            f"`optimizer.type` is {block.get('type')!r} in the DeepSpeed config, but --optimizer is {optimizer!r}: "
            f"make them agree (type {wanted!r}), or drop the `optimizer` block to have one built from --optimizer "
            "and --learning_rate."
        )
    config.setdefault("train_micro_batch_size_per_gpu", 1)
    return config


class FirstOrderEngine:
    """DeepSpeed training of ``model`` with a first-order optimizer: a TrainingEngine (``engines.py``).

    Args:
        model: the model (partitioned at load time under ZeRO-3).
        ds_config: the config from :func:`first_order_config`.
        loss_fn: ``loss_fn(model, batch) -> Tensor`` (the ZO run's loss).
        optimizer: "adamw" or "sgd" (--optimizer), for the outputs.
    """

    forwards_per_micro_batch = 1  # and its backward

    def __init__(self, model: nn.Module, ds_config: dict[str, Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 optimizer: str) -> None:
        import deepspeed

        trainable = [p for p in model.parameters() if p.requires_grad]
        self.ds_engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
        self.loss_fn = loss_fn
        self.description = f"first-order ({optimizer})"
        self.accumulation_steps = int(self.ds_engine.gradient_accumulation_steps())
        self.global_step = 0
        self._micro_batch, self._loss_sum = 0, 0.0
        # What the loop reads (TrainingEngine); fixed once DeepSpeed has wrapped the model.
        self.module: nn.Module = self.ds_engine.module
        self.device = torch.device(self.ds_engine.device)
        self.monitor = self.ds_engine.monitor
        world_size, rank = get_world_size_and_rank()
        self.batch_share = (rank, world_size)

    def step(self, batch: Any) -> dict[str, Any]:
        """Forward, backward and (at the step's last micro-batch) DeepSpeed's optimizer step.

        Returns:
            The metrics row: ``loss`` (at a step's end: averaged over micro-batches and ranks) and ``lr``.
        """
        self.module.eval()  # dropout off, as in the ZO runs: the same function is optimized
        loss = self.loss_fn(self.module, to_device(batch, self.device))
        self.ds_engine.backward(loss)
        self.ds_engine.step()
        self._loss_sum += float(loss.detach().float())
        self._micro_batch += 1
        lr = float(self.ds_engine.get_lr()[0])
        if self._micro_batch < self.accumulation_steps:
            return {"loss": float(loss.detach().float()), "lr": lr}
        (mean,) = mean_over_ranks(self._loss_sum / self.accumulation_steps)
        self._micro_batch, self._loss_sum = 0, 0.0
        self.global_step += 1
        return {"loss": mean, "lr": lr}

    def save_checkpoint(self, root: Path, extra: Mapping[str, Any], keep_last: int) -> Path:
        """Not supported: a first-order baseline runs from start to end (``--save_steps`` is refused)."""
        raise CheckpointError("--save_steps checkpoints ZO runs; a first-order baseline runs from start to end")

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Not supported: a first-order baseline runs from start to end (``--resume`` is refused)."""
        raise CheckpointError("--resume continues ZO runs; a first-order baseline runs from start to end")

    def checkpoint_bytes(self) -> int:
        """0: a first-order baseline writes no checkpoints."""
        return 0

    def save_model(self, path: Path) -> None:
        """Full Hugging Face weights (gathered; rank 0 writes), or the peft adapter. Call on every rank."""
        save_model(self.module, path)
