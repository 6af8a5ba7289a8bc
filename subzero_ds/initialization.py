"""``subzero_ds.initialize``: the DeepSpeed-style entry point that builds a SubZeroEngine."""

from __future__ import annotations

import json
import os
from argparse import Namespace
from typing import Any, Mapping

import deepspeed
import torch
from torch import nn

from .config import ConfigError, UpdateRounding, environment, load_ds_config, parse
from .config.errors import raise_problems
from .distributed import disagreements, get_world_size_and_rank, init_distributed, log
from .engine import LossFn, SubZeroEngine
from . import methods
from .optimizer import ZOOptimizer
from .seeds import stable_seed
from .zero.nvme import partition_for_nvme
from .zero.shards import collect_shards


def initialize(
    model: nn.Module,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    args: Namespace | None = None,
    loss_fn: LossFn | None = None,
) -> SubZeroEngine:
    """Wrap ``model`` in DeepSpeed (ZeRO-0 or ZeRO-3, no DeepSpeed optimizer) for ZO training.

    Args:
        model: the model to fine-tune; parameters with ``requires_grad`` are trained.
        config: a DeepSpeed JSON config (path or dict) with a ``"subzero"`` section.
        args: alternatively, an argparse namespace from ``deepspeed.add_config_arguments``
            (its ``deepspeed_config`` is used when ``config`` is None).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default: ``model(**batch).loss``.

    Returns:
        The :class:`SubZeroEngine`.

    Raises:
        ConfigError: bad or missing config (every problem listed), no trainable parameter, or
            ranks that disagree on the run seed or the config.
    """
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if config is None:
        raise ConfigError(
            "no DeepSpeed config given: pass `config=` (a JSON path or dict with a \"subzero\" section) "
            "or an args namespace with `--deepspeed_config`."
        )
    source = "the DeepSpeed config dict" if isinstance(config, Mapping) else repr(os.fspath(config))
    ds_config = load_ds_config(config)
    settings, deepspeed_settings = parse(ds_config, source)
    raise_problems(environment.nvme_offload_problems(deepspeed_settings), source)

    init_distributed()
    fingerprint = stable_seed(json.dumps(ds_config, sort_keys=True, default=str))
    differing = disagreements({"subzero.seed": settings.seed, "config": fingerprint, "model": model_fingerprint(model)})
    if differing:
        raise ConfigError(
            f"ranks disagree on {', '.join(differing)}: every rank must use the same run seed, the same "
            "DeepSpeed config and the same model (architecture, trainable parameters, dtypes), or their "
            "directions differ and training is silently wrong. Pass the same config file, seed and model to every rank."
        )

    ds_config = dict(deepspeed_settings.section)
    if "train_batch_size" not in ds_config and "train_micro_batch_size_per_gpu" not in ds_config:
        ds_config["train_micro_batch_size_per_gpu"] = 1  # DeepSpeed insists; a ZO step takes any batch
    numels = {name: int(getattr(p, "ds_numel", p.numel())) for name, p in model.named_parameters()}
    raise_problems(environment.nvme_buffer_problems(deepspeed_settings, numels, get_world_size_and_rank()[0]), source)
    partition_for_nvme(model, deepspeed_settings, ds_config)  # NVMe swap buffers in the config's dtype (DeepSpeed bug on CPU)
    ds_engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    accumulation = deepspeed_settings.accumulation_steps

    shards = collect_shards(ds_engine.module)
    if not shards:
        raise ConfigError("the model has no parameter with requires_grad=True: there is nothing to train.")
    frozen = any(not p.requires_grad for p in ds_engine.module.parameters())
    half = sorted({str(s.dtype).removeprefix("torch.") for s in shards if s.dtype == torch.float16})
    if settings.update_rounding is UpdateRounding.STOCHASTIC and half:
        raise ConfigError(
            f"`subzero.update_rounding` is \"stochastic\", but trainable parameters are {', '.join(half)}: "
            "stochastic rounding is implemented for bf16 (fp32 needs none). Train in bf16 (`\"bf16\": "
            "{\"enabled\": true}`) or set `subzero.update_rounding` to \"nearest\"."
        )
    optimizer = ZOOptimizer(shards, methods.build(settings, frozen), settings.eps, in_place=not settings.fused,
                            update_rounding=settings.update_rounding)
    trainable = sum(s.numel for s in shards)
    log(
        f"subzero_ds: {settings.method} ({settings.update}, {settings.queries} quer"
        f"{'y' if settings.queries == 1 else 'ies'}, {accumulation} micro-batch(es) per step) on {len(shards)} "
        f"trainable tensors ({trainable:,} elements), "
        f"ZeRO stage {deepspeed_settings.stage}, lr={settings.lr:g}, eps={settings.eps:g}, {settings.options!r}, "
        f"{'fused ± pass' if settings.fused else 'in-place ± passes'}, update rounding {settings.update_rounding.value}"
    )
    return SubZeroEngine(ds_engine, settings, optimizer, loss_fn, accumulation_steps=accumulation)


def model_fingerprint(model: nn.Module) -> int:
    """A hash of the model's parameter names, full shapes, dtypes and trainability (not its values)."""
    return stable_seed(*(
        (name, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype), p.requires_grad)
        for name, p in model.named_parameters()
    ))
