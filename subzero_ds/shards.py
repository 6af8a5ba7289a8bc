"""One view per trainable parameter: its full shape, this rank's flat range, and the storage.

Under ZeRO-3, ``p.data`` is an empty placeholder and this rank owns the flat elements
[k·P, min((k+1)·P, numel)) of the parameter in ``p.ds_tensor`` (P the partition size, the
last partition padded). Under stage 0 a rank holds the whole parameter: the range is [0, numel).
The optimizer edits ``ParamShard.local()`` in place and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from torch import nn


@dataclass(frozen=True)
class ParamShard:
    """The part of one trainable parameter this rank owns.

    Attributes:
        name: the parameter's name in the model (``model.named_parameters()``).
        param: the parameter itself.
        shape: its full (unpartitioned) shape.
        start, end: this rank's flat range [start, end) of the full parameter (may be empty).
    """

    name: str
    param: nn.Parameter
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        """Elements in the full parameter."""
        return int(torch.Size(self.shape).numel())

    @property
    def is_matrix(self) -> bool:
        """True for 2-D parameters: they get weight decay and, with SubZero, a low-rank direction."""
        return len(self.shape) == 2

    def local(self) -> torch.Tensor:
        """A 1-D view of the owned elements (padding excluded); in-place edits reach the model."""
        if is_partitioned(self.param):
            return self.param.ds_tensor.data.view(-1)[: self.end - self.start]
        return self.param.data.view(-1)


    @property
    def is_persistent(self) -> bool:
        """Whether ZeRO-3 keeps this (small) parameter gathered between forwards."""
        return is_partitioned(self.param) and bool(getattr(self.param, "ds_persist", False))

    def gathered(self) -> torch.Tensor | None:
        """The full 1-D copy of a ZeRO-3 parameter while it is gathered, else None.

        DeepSpeed keeps persistent parameters gathered after their first forward and never
        re-reads their shard, so an edit must reach this copy too.
        """
        if is_partitioned(self.param) and self.param.ds_status is ZeroParamStatus.AVAILABLE:
            return self.param.data.view(-1)
        return None


def is_partitioned(param: nn.Parameter) -> bool:
    """Whether ZeRO-3 manages this parameter (it then has ``ds_tensor``)."""
    return hasattr(param, "ds_tensor")


def owned_range(param: nn.Parameter) -> tuple[int, int]:
    """This rank's flat range of ``param``: a ZeRO-3 partition, or everything."""
    if not is_partitioned(param):
        return 0, param.numel()
    numel = int(param.ds_numel)
    partition_size = int(param.ds_tensor.ds_numel)
    group = param.ds_process_group
    rank = dist.get_rank(group=group) if dist.is_initialized() else 0
    start = min(rank * partition_size, numel)
    return start, min(start + partition_size, numel)


def collect_shards(model: nn.Module) -> list[ParamShard]:
    """A :class:`ParamShard` for every parameter with ``requires_grad`` (tied weights once)."""
    shards = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shape = tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)
        start, end = owned_range(param)
        shards.append(ParamShard(name=name, param=param, shape=shape, start=start, end=end))
    return shards
