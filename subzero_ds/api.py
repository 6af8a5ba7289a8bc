"""``subzero_ds.initialize``: the DeepSpeed-style entry point that builds a SubZeroEngine.

parse the config → start the process group → the ranks agree → ``deepspeed.initialize`` → build the
method over this rank's shards.
"""

from __future__ import annotations

import json
import os
from argparse import Namespace
from typing import Any, Mapping

import deepspeed
import torch
from torch import nn

from . import methods
from .config import (ConfigError, DeepSpeedSettings, ReplicaMode, SubZeroConfig, UpdateRounding, environment,
                     load_ds_config, parse)
from .config.deepspeed import deepspeed_accepts
from .config.errors import raise_problems
from .distributed import disagreements, get_world_size_and_rank, init_distributed, log
from .engine import SubZeroEngine
from .loss import LossFn
from .seeds import stable_seed
from .zero.nvme import partition_for_nvme
from .zero.replicas import Replicas
from .zero.shards import ParamShard, collect_shards


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
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default: the model's own loss (a language
            model's scored inside its LM head, :mod:`subzero_ds.loss`).

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
    raise_problems(deepspeed_accepts(deepspeed_settings.section), source)  # DeepSpeed's own parser, before it runs
    raise_problems(environment.nvme_offload_problems(deepspeed_settings), source)

    init_distributed(timeout=settings.collective_timeout)
    raise_problems(environment.hpz_problems(deepspeed_settings, get_world_size_and_rank()[0]), source)
    _agree(settings, ds_config, model)
    ds_engine = _deepspeed_engine(model, deepspeed_settings, source)
    shards = collect_shards(ds_engine.module)
    _check_trainable(shards, settings)
    frozen = any(not p.requires_grad for p in ds_engine.module.parameters())
    replicas = Replicas.of(settings.replica_mode, deepspeed_settings.stage, deepspeed_settings.hpz_partition_size,
                           *get_world_size_and_rank(), queries=settings.queries)
    if settings.replica_mode is ReplicaMode.PERTURBATION and not replicas.splits_directions:
        log(f"subzero_ds: replica_mode \"perturbation\" with one replica group ({replicas.size} rank(s) hold the one "
            "model copy) is data mode; use ZeRO++ hpZ (zero_hpz_partition_size) or ZeRO-0 for several groups")
    method = methods.build(settings, frozen_parameters=frozen, queries=replicas.step_queries)
    log(f"subzero_ds: {settings.method} ({settings.update}, {settings.queries} quer"
        f"{'y' if settings.queries == 1 else 'ies'}, {deepspeed_settings.accumulation_steps} micro-batch(es) per step) "
        f"on {len(shards)} trainable tensors ({sum(s.numel for s in shards):,} elements), "
        f"ZeRO stage {deepspeed_settings.stage}, lr={settings.lr:g}, eps={settings.eps:g}, {settings.options!r}, "
        f"{'fused ± pass' if settings.fused else 'in-place ± passes'}, update rounding {settings.update_rounding.value}, "
        f"{replicas.describe()}" + hpz_note(shards))
    return SubZeroEngine(ds_engine, settings, method, shards, loss_fn, deepspeed_settings.accumulation_steps, replicas)


def _agree(settings: SubZeroConfig, ds_config: Mapping[str, Any], model: nn.Module) -> None:
    """Every rank must have the same run seed, config and model, or their directions silently differ."""
    fingerprint = stable_seed(json.dumps(ds_config, sort_keys=True, default=str))
    differing = disagreements({"subzero.seed": settings.seed, "config": fingerprint, "model": model_fingerprint(model)})
    if differing:
        raise ConfigError(
            f"ranks disagree on {', '.join(differing)}: every rank must use the same run seed, the same "
            "DeepSpeed config and the same model (architecture, trainable parameters, dtypes), or their "
            "directions differ and training is silently wrong. Pass the same config file, seed and model to every rank."
        )


def _deepspeed_engine(model: nn.Module, settings: DeepSpeedSettings, source: str) -> Any:
    """``deepspeed.initialize`` without an optimizer: ZeRO-3's parameter partitioning, or ZeRO-0."""
    ds_config = dict(settings.section)
    if "train_batch_size" not in ds_config and "train_micro_batch_size_per_gpu" not in ds_config:
        ds_config["train_micro_batch_size_per_gpu"] = 1  # DeepSpeed insists; a ZO step takes any batch
    numels = {name: int(getattr(p, "ds_numel", p.numel())) for name, p in model.named_parameters()}
    raise_problems(environment.nvme_buffer_problems(settings, numels, get_world_size_and_rank()[0]), source)
    partition_for_nvme(model, settings, ds_config)  # NVMe swap buffers in the config's dtype (DeepSpeed bug on CPU)
    create_hpz_groups(settings.hpz_partition_size)
    ds_engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    return ds_engine


def create_hpz_groups(size: int) -> None:
    """Form ZeRO++ hpZ's groups of ``size`` consecutive ranks (``zero_hpz_partition_size``), with DeepSpeed's own
    function.

    ``deepspeed.initialize`` without an optimizer would call ``_set_zero_group_parallelism``, which
    only its ZeRO-3 optimizer has (AttributeError, DeepSpeed ≤ 0.19.8); it skips that call when the
    groups exist. ``zero.Init`` (``HfDeepSpeedConfig`` + ``from_pretrained``) forms them the same way.
    DeepSpeed keeps them in a global that every later engine of the process would use, hpZ or not:
    groups of another size are dropped first.
    """
    import torch.distributed as dist
    from deepspeed.utils import groups

    existing = groups._get_zero_param_intra_parallel_group()
    if existing is not None and dist.get_world_size(existing) != min(size, dist.get_world_size()):
        groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None  # a previous engine's
    if size > 1 and groups._get_zero_param_intra_parallel_group() is None:
        groups._create_zero_param_parallel_group(size)


def hpz_note(shards: list[ParamShard]) -> str:
    """What the log says of ZeRO++ hpZ's secondary copies (which subzero_ds writes alongside the shards)."""
    copies = sum(shard.secondary() is not None for shard in shards)
    return f", ZeRO++ hpZ secondary copies of {copies} of {len(shards)} trainable tensors" if copies else ""


def _check_trainable(shards: list[ParamShard], settings: SubZeroConfig) -> None:
    if not shards:
        raise ConfigError("the model has no parameter with requires_grad=True: there is nothing to train.")
    half = sorted({str(s.dtype).removeprefix("torch.") for s in shards if s.dtype == torch.float16})
    if settings.update_rounding is UpdateRounding.STOCHASTIC and half:
        raise ConfigError(
            f"`subzero.update_rounding` is \"stochastic\", but trainable parameters are {', '.join(half)}: "
            "stochastic rounding is implemented for bf16 (fp32 needs none). Train in bf16 (`\"bf16\": "
            "{\"enabled\": true}`) or set `subzero.update_rounding` to \"nearest\"."
        )


def model_fingerprint(model: nn.Module) -> int:
    """A hash of the model's parameter names, full shapes, dtypes and trainability (not its values)."""
    return stable_seed(*(
        (name, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype), p.requires_grad)
        for name, p in model.named_parameters()
    ))
