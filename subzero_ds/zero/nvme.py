"""ZeRO-Infinity's NVMe offload: partitioning a model so that its swap buffers have the config's dtype."""

from __future__ import annotations

from typing import Any, Mapping

import deepspeed
from torch import nn

from ..config import DeepSpeedSettings
from .shards import is_partitioned


def partition_for_nvme(model: nn.Module, settings: DeepSpeedSettings, ds_config: Mapping[str, Any]) -> None:
    """Partition ``model`` for NVMe offload with swap buffers of the config's dtype (call before
    ``deepspeed.initialize``; a no-op unless ``offload_param.device`` is ``"nvme"`` and the model is
    not partitioned yet).

    Why: ``deepspeed.initialize`` partitions a plain model with ``zero.Init(dtype=<model dtype>)``,
    and DeepSpeed 0.19's ``_set_dtype`` (``dtype or torch.float16 if is_fp16_supported() else
    torch.bfloat16 …``) drops that dtype on an accelerator without fp16 (the CPU one): the NVMe swap
    buffers become bf16 and the first forward of an fp32 model fails with "expected m1 and m2 to have
    the same dtype". ``zero.Init`` given the config and no dtype takes the dtype from the config
    (fp32 unless ``bf16``/``fp16`` is enabled), as ``from_pretrained`` under ``HfDeepSpeedConfig`` does.
    Floating parameters are first cast to that dtype, as ``deepspeed.initialize`` would.

    Args:
        model: the model about to be wrapped.
        settings: the DeepSpeed settings.
        ds_config: the config DeepSpeed receives (with a batch size set).
    """
    if not settings.offloads_to_nvme or any(is_partitioned(p) for p in model.parameters()):
        return  # not NVMe, or partitioned at load time (HfDeepSpeedConfig): zero.Init already had the config
    dtype = settings.precision.dtype
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    deepspeed.zero.Init(module=model, config_dict_or_path=dict(ds_config))
