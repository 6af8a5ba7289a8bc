"""What the planner is told about a run besides the model: its ZeRO-3 settings, the cluster, the micro-batch.

:func:`load_zero_settings` reads a DeepSpeed config through :func:`subzero_ds.config.parse` (the
same parse a run makes) into :class:`ZeroSettings`, which keeps the parsed ``"subzero"`` section and
looks its method and update rule up in :mod:`subzero_ds.methods.registry`; :class:`Cluster` and
:class:`BatchShape` are given directly (or by the command line's flags).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from ..config import ConfigError, SubZeroConfig, load_ds_config, parse
from ..methods import registry
from ..methods.registry import MethodSpec, UpdateSpec
from .errors import MemoryPlanError

GiB = 2**30

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# DeepSpeed ZeRO-3 defaults (deepspeed/runtime/zero/config.py, offload_config.py).
DEFAULT_PREFETCH_BUCKET = 50_000_000
DEFAULT_MAX_LIVE = 1_000_000_000
DEFAULT_MAX_REUSE = 1_000_000_000
DEFAULT_PERSISTENCE = 100_000
DEFAULT_NVME_BUFFER_COUNT = 5
DEFAULT_NVME_BUFFER_SIZE = 100_000_000

# An H100 SXM node (DGX/HGX H100), per GPU. NVLink 4: 18 links, 900 GB/s both directions together,
# so 450 GB/s = 3600 Gbit/s each way; one 400 Gbit/s NIC (ConnectX-7, NDR InfiniBand) per GPU;
# dense bf16 peak 989 TFLOP/s, of which ~40% (400) is a sustained rate for large matmuls.
H100_NVLINK_GBPS = 3600.0
H100_NIC_GBPS = 400.0
H100_SUSTAINED_TFLOPS = 400.0


class Offload(str, Enum):
    """Where ZeRO-3 keeps the parameter shards (``zero_optimization.offload_param.device``)."""

    NONE = "none"
    CPU = "cpu"
    NVME = "nvme"


@dataclass(frozen=True)
class ZeroSettings:
    """What the planner reads from a DeepSpeed config (stage 3) and its ``"subzero"`` section.

    ``subzero`` is the parsed section (defaults: SubZero at rank 24, ZO-SGD, in place). What the
    planner knows of its method and update rule (state, working chunks, subspace rank) comes from
    their registered specs, :attr:`method_spec` and :attr:`update_spec`.
    """

    precision: str = "bf16"
    offload: Offload = Offload.NONE
    prefetch_bucket: int = DEFAULT_PREFETCH_BUCKET
    max_live: int = DEFAULT_MAX_LIVE
    max_reuse: int = DEFAULT_MAX_REUSE
    persistence_threshold: int = DEFAULT_PERSISTENCE
    nvme_buffer_count: int = DEFAULT_NVME_BUFFER_COUNT
    nvme_buffer_size: int = DEFAULT_NVME_BUFFER_SIZE
    hpz_partition_size: int = 1  # ZeRO++ hpZ: K ranks hold a secondary copy of the model; 0 or 1: off
    # The section's defaults (SubZeroConfig() is not built bare: its validator reads a flat section).
    subzero: SubZeroConfig = field(default_factory=lambda: SubZeroConfig.from_section({}))

    @property
    def dtype_bytes(self) -> int:
        """Bytes of one parameter (and activation) element."""
        return DTYPE_BYTES[self.precision]

    @property
    def fused(self) -> bool:
        """Whether ℓ+ and ℓ− come from one forward over the doubled batch (``subzero.fused``)."""
        return self.subzero.fused

    @property
    def method_spec(self) -> MethodSpec:
        """The registered spec of ``subzero.method``."""
        return registry.method(self.subzero.method)

    @property
    def update_spec(self) -> UpdateSpec | None:
        """The registered spec of ``subzero.update``; None when the method brings its own update rule
        (its state is then all in :attr:`method_spec`)."""
        return None if self.method_spec.update_rule is not None else registry.update(self.subzero.update)

    @property
    def subspace_rank(self) -> int | None:
        """r when the method's matrix directions live in a rank-r subspace (``MethodSpec.subspace_rank``);
        None otherwise."""
        rank = self.method_spec.subspace_rank
        return None if rank is None else rank(self.subzero.options)

    def with_fused(self, fused: bool) -> ZeroSettings:
        """These settings with ``subzero.fused`` set to ``fused`` (whether the planner models it is checked by
        :func:`~subzero_ds.memory.estimate`)."""
        return replace(self, subzero=self.subzero.model_copy(update={"fused": fused}))

    def hpz_group(self, world: int) -> int:
        """Ranks in an hpZ group, K (DeepSpeed caps it at the world size); 1 when hpZ is off."""
        return max(1, min(self.hpz_partition_size, world))


def load_zero_settings(config: str | os.PathLike | Mapping[str, Any]) -> ZeroSettings:
    """Read a DeepSpeed config (JSON path or dict) into :class:`ZeroSettings`.

    Raises:
        MemoryPlanError: missing/invalid file, or a stage other than 3.
        subzero_ds.config.ConfigError: a bad ``"subzero"`` section or DeepSpeed setting (every problem listed).
    """
    source = "the DeepSpeed config dict" if isinstance(config, Mapping) else repr(os.fspath(config))
    try:
        ds = load_ds_config(config)
    except ConfigError as e:
        raise MemoryPlanError(str(e)) from None
    settings, deepspeed = parse(ds, source)
    if deepspeed.stage != 3:
        raise MemoryPlanError(
            f"{source}: `zero_optimization.stage` is {deepspeed.stage!r}; the planner models ZeRO-3 "
            "(partitioned parameters). Set it to 3."
        )
    return ZeroSettings(
        precision=deepspeed.precision.value, offload=Offload(deepspeed.offload_device),
        prefetch_bucket=deepspeed.prefetch_bucket_size, max_live=deepspeed.max_live_parameters,
        max_reuse=deepspeed.max_reuse_distance, persistence_threshold=deepspeed.persistence_threshold,
        nvme_buffer_count=deepspeed.nvme_buffer_count, nvme_buffer_size=deepspeed.nvme_buffer_size,
        hpz_partition_size=deepspeed.hpz_partition_size, subzero=settings,
    )


@dataclass(frozen=True)
class Cluster:
    """The machines: ``nodes`` × ``gpus_per_node`` ranks; memory per GPU and per node, in GiB.

    The step time reads the links and the compute rate, per GPU: ``intra_node_gbps`` (Gbit/s each
    way between GPUs of a node), ``inter_node_gbps`` (Gbit/s of network each way), ``tflops``
    (sustained dense TFLOP/s). The defaults are an H100 SXM node's (NVLink 4, one 400G NIC per GPU).
    """

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    cpu_memory_gib: float = 1024.0
    nvme_gib: float | None = None  # per node; None: not checked
    intra_node_gbps: float = H100_NVLINK_GBPS
    inter_node_gbps: float = H100_NIC_GBPS
    tflops: float = H100_SUSTAINED_TFLOPS

    @property
    def world(self) -> int:
        """Number of ranks."""
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class BatchShape:
    """This rank's micro-batch: rows × tokens."""

    batch_size: int = 1
    seq_len: int = 512


def check_positive(**values: float) -> None:
    """Raise MemoryPlanError naming the first of ``values`` (key=value) that is not a finite number > 0."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
            raise MemoryPlanError(f"`{key}` is {value!r}; it must be a finite number > 0. Pass a positive value.")
