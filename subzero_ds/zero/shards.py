"""One view per trainable parameter: its full shape, this rank's flat range, and the storage.

Under ZeRO-3, ``p.data`` is an empty placeholder and this rank owns the flat elements
[k·P, min((k+1)·P, numel)) of the parameter in ``p.ds_tensor`` (P the partition size, the
last partition padded). Under stage 0 a rank holds the whole parameter: the range is [0, numel).
The shard writer (``writer.py``) edits ``ParamShard.local()`` in place and nothing else.

With ``offload_param: {"device": "nvme"}`` (ZeRO-Infinity) a partition of at least 1 MiB lives in
a swap file, and ``p.ds_tensor`` is a 1-element placeholder between forwards. Such a shard is
reached only inside ``with shard.swapped_in() as local:``, which reads it into one of DeepSpeed's
swap buffers and writes it back afterwards; DeepSpeed itself releases a partition after a forward
*without* writing it, so an edit made any other way is silently lost. ``offload_param: {"device":
"cpu"}`` needs nothing special: the partition is an ordinary CPU tensor.

With ZeRO++ hpZ (``zero_hpz_partition_size`` = K) a parameter has a second copy: the ranks of each
group of K consecutive ranks (a node) also hold 1/K of it each (``p.ds_secondary_tensor``), and a
forward gathers from that copy, inside the group, so no layer crosses the nodes' network. DeepSpeed
refreshes it only in its own optimizer's step: every write of ours must reach it too, or the
forwards silently read the old weights. A rank's secondary range is a pure function of its place
in its group, so it is written from the same positions of the same direction, with no communication.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus
from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
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
        secondary_start, secondary_end: this rank's flat range of hpZ's secondary copy (empty without hpZ).
    """

    name: str
    param: nn.Parameter
    shape: tuple[int, ...]
    start: int
    end: int
    secondary_start: int = 0
    secondary_end: int = 0

    @property
    def numel(self) -> int:
        """Elements in the full parameter."""
        return int(torch.Size(self.shape).numel())

    @property
    def is_matrix(self) -> bool:
        """True for 2-D parameters: they get weight decay and, with SubZero, a low-rank direction."""
        return len(self.shape) == 2

    @property
    def local_numel(self) -> int:
        """Elements this rank owns (``end - start``), valid even while the shard is swapped out."""
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype:
        """The parameter's dtype (a backup of :meth:`local` in this dtype round-trips exactly)."""
        return self.param.dtype

    @property
    def device(self) -> torch.device:
        """Where this rank's elements live: the accelerator, or the host with ``offload_param`` cpu/nvme."""
        if self.is_nvme_offloaded:
            return torch.device("cpu")  # swapped in to a host buffer
        return self.param.ds_tensor.device if is_partitioned(self.param) else self.param.device

    @property
    def is_nvme_offloaded(self) -> bool:
        """Whether this rank's partition lives in an NVMe swap file (reach it via :meth:`swapped_in`)."""
        return is_partitioned(self.param) and getattr(self.param.ds_tensor, "final_location", None) == OffloadDeviceEnum.nvme

    def local(self) -> torch.Tensor:
        """A 1-D view of the owned elements (padding excluded); in-place edits reach the model.

        Raises:
            RuntimeError: the shard is swapped out to NVMe (use :meth:`swapped_in`).
        """
        if is_partitioned(self.param):
            if self.is_nvme_offloaded and self.param.ds_tensor.status is not PartitionedParamStatus.AVAILABLE:
                raise RuntimeError(
                    f"the shard of {self.name!r} is swapped out to NVMe (its ds_tensor is a placeholder): "
                    "read or edit it inside `with shard.swapped_in() as local:`"
                )
            return self.param.ds_tensor.data.view(-1)[: self.local_numel]
        return self.param.data.view(-1)

    @contextmanager
    def swapped_in(self) -> Iterator[torch.Tensor]:
        """Yield :meth:`local` wherever the shard lives; an NVMe shard is swapped in, then written back.

        Without NVMe offload this is :meth:`local` and costs nothing. With it, the partition is read
        into a DeepSpeed swap buffer (one of ``offload_param.buffer_count``), and on exit written to
        its swap file synchronously and the buffer released, so the next gather reads the edit.
        Enter it for one shard at a time, between forwards.
        """
        if not self.is_nvme_offloaded:
            yield self.local()
            return
        swapper = self.param.nvme_swapper
        status = self.param.ds_tensor.status
        if status is PartitionedParamStatus.INFLIGHT:  # a prefetch is reading it: wait for that read
            swapper.synchronize_reads()
        elif status is PartitionedParamStatus.NOT_AVAILABLE:
            swapper.swap_in([self.param], async_op=False)
        try:
            yield self.local()
        finally:
            # DeepSpeed never writes a partition back on release: without this the edit is lost.
            swapper.swap_out_and_release([self.param])

    def secondary(self) -> torch.Tensor | None:
        """A 1-D view of this rank's range of hpZ's secondary copy (padding excluded), or None when the
        parameter has none (no hpZ, or DeepSpeed has not built it yet)."""
        copy = getattr(self.param, "ds_secondary_tensor", None)
        if copy is None or self.secondary_end == self.secondary_start:
            return None
        return copy.data.view(-1).narrow(0, 0, self.secondary_end - self.secondary_start)

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


def order_before_gathers(shards: list[ParamShard]) -> None:
    """Make the writes to ``shards`` complete before any later ZeRO-3 all-gather reads them.

    DeepSpeed gathers on its own CUDA stream, with no dependency on the stream our kernels ran on:
    without this, the next forward could gather a half-written shard. Host shards need nothing.
    """
    devices = ({shard.device for shard in shards} | {s.param.device for s in shards if s.gathered() is not None}
               | {copy.device for s in shards if (copy := s.secondary()) is not None})
    for device in devices:
        if device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.current_stream(device).synchronize()


def is_partitioned(param: nn.Parameter) -> bool:
    """Whether ZeRO-3 manages this parameter (it then has ``ds_tensor``)."""
    return hasattr(param, "ds_tensor")


def owned_range(param: nn.Parameter) -> tuple[int, int]:
    """This rank's flat range of ``param``: a ZeRO-3 partition, or everything."""
    if not is_partitioned(param):
        return 0, param.numel()
    numel = int(param.ds_numel)
    partition_size = int(param.ds_tensor.ds_numel)  # not ds_tensor.numel(): that is 1 while swapped out to NVMe
    group = param.ds_process_group
    rank = dist.get_rank(group=group) if dist.is_initialized() else 0
    return _part(rank, partition_size, numel)


def secondary_range(param: nn.Parameter) -> tuple[int, int]:
    """This rank's flat range of ``param``'s hpZ secondary copy; empty without hpZ.

    As DeepSpeed cuts it (``Init._partition_param_sec``): the padded parameter in K equal parts, K the
    hpZ group size, part j for the rank of index j in its group.
    """
    group = getattr(param, "ds_zero_param_process_group", None)
    if not is_partitioned(param) or group is None:
        return 0, 0
    size = int(param.ds_tensor.ds_numel) * int(param.ds_secondary_tensor_num_of_groups)
    return _part(dist.get_rank(group=group), size, int(param.ds_numel))


def _part(index: int, size: int, numel: int) -> tuple[int, int]:
    """Part ``index`` of a parameter of ``numel`` elements cut in parts of ``size`` (the padding left out)."""
    start = min(index * size, numel)
    return start, min(start + size, numel)


def collect_shards(model: nn.Module) -> list[ParamShard]:
    """A :class:`ParamShard` for every parameter with ``requires_grad`` (tied weights once)."""
    shards = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shape = tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)
        start, end = owned_range(param)
        secondary_start, secondary_end = secondary_range(param)
        shards.append(ParamShard(name=name, param=param, shape=shape, start=start, end=end,
                                 secondary_start=secondary_start, secondary_end=secondary_end))
    return shards


