"""The estimate: a ZO step's items and the first-order comparison, whether they fit, and what would make them fit.

:func:`estimate` is the planner's entry point; ``zo_step.py`` models what a rank holds during a ZO
step, ``step_time.py`` how long the step takes, ``first_order.py`` the AdamW comparison,
``report.py`` renders the result.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import DeepSpeedSettings, hpz_state_problems
from ..methods import registry
from ..methods.registry import MethodSpec
from .architectures import Architecture, load_architecture
from .errors import MemoryPlanError
from .first_order import first_order_items
from .settings import GiB, BatchShape, Cluster, Offload, ZeroSettings, check_positive, load_zero_settings
from .step_time import StepTime, check_hpz, step_time
from .zo_step import Item, zo_items


@dataclass
class Estimate:
    """Per-rank memory of a ZO step (``items``) and of first-order AdamW (``first_order``).

    Attributes:
        fits / first_order_fits: whether GPU, CPU (per node) and NVMe (per node) suffice.
        peak_moment: the point of the forward where the GPU peak is reached.
        advice: what to change when the ZO run does not fit (empty when it fits).
        step: the ZO step's time (None on a CPU-only run).
        speed_advice: on more than one node, whether ZeRO++ hpZ would shorten the step and fits, or why not.
    """

    architecture: Architecture
    zero: ZeroSettings
    cluster: Cluster
    batch: BatchShape
    device: str
    items: list[Item]
    first_order: list[Item]
    peak_moment: str
    fits: bool = False
    first_order_fits: bool = False
    problems: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    step: StepTime | None = None
    speed_advice: list[str] = field(default_factory=list)

    @staticmethod
    def _sum(items: list[Item], tier: str) -> float:
        return sum(getattr(item, tier) for item in items)

    def total(self, tier: str, first_order: bool = False) -> float:
        """Bytes per rank on ``tier`` ("gpu", "cpu" or "nvme")."""
        return self._sum(self.first_order if first_order else self.items, tier)

    @property
    def host_total(self) -> float:
        """GPU + CPU bytes per rank: what a CPU-only run holds in host RAM (validation)."""
        return self.total("gpu") + self.total("cpu")

    def report(self) -> str:
        """The itemised table, the verdict and the advice, as text."""
        from .report import render_report  # report.py imports this module (the table calls estimate)

        return render_report(self)


def estimate(
    model: str | os.PathLike | Architecture,
    zero_config: str | os.PathLike | Mapping[str, Any] | ZeroSettings,
    cluster: Cluster = Cluster(),
    batch: BatchShape = BatchShape(),
    device: str = "cuda",
    attention: str = "sdpa",
) -> Estimate:
    """Per-rank memory of a ZO step under ZeRO-3, itemised, with a first-order AdamW comparison and the step time.

    Args:
        model: a built-in name (``BUILTIN_MODELS``), a config.json path or directory, or an Architecture.
        zero_config: a DeepSpeed JSON path or dict (stage 3, with a ``"subzero"`` section), or ZeroSettings.
        cluster: nodes, GPUs per node, GPU memory, CPU memory per node (GiB), link rates, TFLOP/s.
        batch: this rank's micro-batch (rows × tokens).
        device: ``"cuda"``, or ``"cpu"`` for a CPU-only run where "GPU" bytes live in host RAM
            (all of them are then reported in the CPU column).
        attention: ``"sdpa"`` (fused kernels: no S×S scores materialised) or ``"eager"``.

    Returns:
        The :class:`Estimate`; ``fits`` and ``advice`` say whether and how it fits, ``step`` how long a
        step takes and ``speed_advice`` whether hpZ would shorten it.

    Raises:
        MemoryPlanError: an unknown model, missing file or bad number (names the value and the fix).
    """
    arch = load_architecture(model)
    zero = zero_config if isinstance(zero_config, ZeroSettings) else load_zero_settings(zero_config)
    check_positive(
        nodes=cluster.nodes, gpus_per_node=cluster.gpus_per_node, gpu_memory_gib=cluster.gpu_memory_gib,
        cpu_memory_gib=cluster.cpu_memory_gib, batch_size=batch.batch_size, seq_len=batch.seq_len,
        intra_node_gbps=cluster.intra_node_gbps, inter_node_gbps=cluster.inter_node_gbps, tflops=cluster.tflops,
    )  # fmt: skip
    for key in ("nodes", "gpus_per_node"):
        if int(getattr(cluster, key)) != getattr(cluster, key):
            raise MemoryPlanError(f"`{key}` is {getattr(cluster, key)!r}; it must be a whole number. Pass an integer.")
    if device not in ("cuda", "cpu"):
        raise MemoryPlanError(f"`device` is {device!r}; use \"cuda\" (GPUs) or \"cpu\" (a CPU-only validation run).")
    if attention not in ("sdpa", "eager"):
        raise MemoryPlanError(f"`attention` is {attention!r}; use \"sdpa\" or \"eager\".")
    if zero.fused and not _fused_modelled(zero.method_spec):
        low_rank = " or ".join(f'"{name}"' for name in registry.method_names() if _fused_modelled(registry.method(name)))
        raise MemoryPlanError(
            f"`subzero.fused` is true with `subzero.method` \"{zero.method_spec.name}\": the planner models the fused "
            "± pass for low-rank directions only (a full-rank direction is materialised per gathered layer). Set "
            f"`fused` to false, or `method` to {low_rank}."
        )
    check_hpz(zero, cluster)
    if batch.seq_len > arch.max_positions:
        raise MemoryPlanError(
            f"`seq_len` is {batch.seq_len}, longer than {arch.name}'s {arch.max_positions} positions. Use a shorter sequence."
        )
    items = zo_items(arch, zero, cluster, batch, device, attention)
    first_order = first_order_items(arch, zero, cluster, batch, device, attention)
    result = Estimate(arch, zero, cluster, batch, device, items[0], first_order, peak_moment=items[1])
    result.problems = _capacity_problems(result, first_order=False)
    result.fits = not result.problems
    result.first_order_fits = not _capacity_problems(result, first_order=True)
    if not result.fits:
        result.advice = _advice(result, attention)
    if device == "cuda":
        result.step = step_time(arch, zero, cluster, batch)
        result.speed_advice = _hpz_advice(result, attention)
    return result


def _problems(arch: Architecture, zero: ZeroSettings, cluster: Cluster, batch: BatchShape, device: str,
              attention: str) -> list[str]:  # fmt: skip
    """The capacity problems of the ZO step under these settings (empty: it fits)."""
    items, moment = zo_items(arch, zero, cluster, batch, device, attention)
    return _capacity_problems(Estimate(arch, zero, cluster, batch, device, items, [], moment), first_order=False)


def _capacity_problems(result: Estimate, first_order: bool) -> list[str]:
    c = result.cluster
    gpu, cpu, nvme = (result.total(t, first_order) for t in ("gpu", "cpu", "nvme"))
    problems = []
    if result.device == "cpu":
        node = cpu * c.gpus_per_node
        if node > c.cpu_memory_gib * GiB:
            problems.append(f"host RAM: {node / GiB:.1f} GiB per node needed, {c.cpu_memory_gib:g} GiB available")
        return problems
    if gpu > c.gpu_memory_gib * GiB:
        problems.append(f"GPU: {gpu / GiB:.1f} GiB per rank needed, {c.gpu_memory_gib:g} GiB available")
    if cpu * c.gpus_per_node > c.cpu_memory_gib * GiB:
        problems.append(
            f"CPU: {cpu * c.gpus_per_node / GiB:.1f} GiB per node needed ({c.gpus_per_node} ranks), "
            f"{c.cpu_memory_gib:g} GiB available"
        )
    if c.nvme_gib is not None and nvme * c.gpus_per_node > c.nvme_gib * GiB:
        problems.append(f"NVMe: {nvme * c.gpus_per_node / GiB:.1f} GiB per node needed, {c.nvme_gib:g} GiB available")
    return problems


def _advice(result: Estimate, attention: str) -> list[str]:
    """Changes that make the ZO run fit, each checked by re-estimating (most local change first)."""
    arch, zero, cluster, batch, device = result.architecture, result.zero, result.cluster, result.batch, result.device

    def fits(z: ZeroSettings = zero, c: Cluster = cluster, b: BatchShape = batch) -> bool:
        return not _problems(arch, z, c, b, device, attention)

    advice = []
    if _fused_modelled(zero.method_spec) and fits(zero.with_fused(not zero.fused)):
        advice.append(
            f"set `subzero.fused` to {str(not zero.fused).lower()} "
            + ("(no backup copy; activations double)" if not zero.fused else "(activations halve; adds a backup copy)")
        )
    for target in (Offload.CPU, Offload.NVME):
        if zero.offload is not target and fits(replace(zero, offload=target)):
            advice.append(f"offload the parameters: `zero_optimization.offload_param.device` = \"{target.value}\"")
    if zero.prefetch_bucket and fits(replace(zero, prefetch_bucket=0)):
        advice.append("set `zero_optimization.stage3_prefetch_bucket_size` to 0 (slower: no prefetch)")
    rows = batch.batch_size // 2
    while rows >= 1:
        if fits(b=replace(batch, batch_size=rows)):
            advice.append(f"lower the per-device batch to {rows} (same global batch: more ranks or more steps)")
            break
        rows //= 2
    nodes = cluster.nodes * 2
    while nodes <= 1024:
        if fits(c=replace(cluster, nodes=nodes)):
            advice.append(f"use {nodes} nodes ({nodes * cluster.gpus_per_node} ranks) instead of {cluster.nodes}")
            break
        nodes *= 2
    if not advice:
        advice.append(
            "no single change above suffices: combine offload, a smaller batch and more nodes, or use PEFT "
            "(LoRA) so that only adapters are trained"
        )
    return advice


def _hpz_advice(result: Estimate, attention: str) -> list[str]:
    """On more than one node with hpZ off: ZeRO++ hpZ with K = GPUs per node, its gain (each forward
    gathers inside the node) and its cost (a 1/K secondary copy per rank), or why it does not fit.
    On one node with hpZ over all of it: that it buys no time there."""
    arch, zero, cluster, batch, plain = result.architecture, result.zero, result.cluster, result.batch, result.step
    k = cluster.gpus_per_node
    if zero.hpz_group(cluster.world) > 1:
        if zero.hpz_group(cluster.world) < cluster.world:  # groups smaller than the world: fewer bytes, replicas
            return []
        return ["set `zero_optimization.zero_hpz_partition_size` to 1: on one node plain ZeRO-3 already gathers "
                "over NVLink, so hpZ's secondary copy buys no time"]
    if cluster.nodes == 1 or zero.offload is Offload.NVME:
        return []
    stateful = hpz_state_problems(zero.subzero, DeepSpeedSettings(section={}, stage=3, hpz_partition_size=k))
    if stateful:  # a direction's per-element state (HiZOO's) is kept for the shard's range only
        return [f"ZeRO++ hpZ would keep the gathers inside each node, but {stateful[0]}"]
    hpz = replace(zero, hpz_partition_size=k)
    faster = step_time(arch, hpz, cluster, batch)
    key = f'`"zero_optimization": {{"zero_hpz_partition_size": {k}}}`'
    gain = (f"each forward gathers {faster.within_node_bytes / GiB:.1f} GiB per GPU inside its node instead of "
            f"{plain.across_node_bytes / GiB:.1f} GiB across nodes, so a step takes ~{faster.total_s:.2f} s instead "
            f"of ~{plain.total_s:.2f} s")  # fmt: skip
    copies = "its secondary copy (1/K of the model)" + ("" if zero.fused else
                                                         " and that copy's in-place backup, less the shard's")
    extra = _zo_bytes(arch, hpz, cluster, batch, attention) - _zo_bytes(arch, zero, cluster, batch, attention)
    problems = _problems(arch, hpz, cluster, batch, result.device, attention)
    if not problems:
        where = "GPU" if zero.offload is Offload.NONE else "CPU"
        return [f"use ZeRO++ hpZ, {key}: {gain}. It costs {extra / GiB:.1f} GiB more {where} memory per rank "
                f"({copies}). In replica-mode perturbation its {faster.replicas} groups of {k} GPUs evaluate "
                f"{faster.replicas} directions per step in that time (+ one all-reduce of their loss pairs)."]
    fused_fits = (not zero.fused and _fused_modelled(zero.method_spec)
                  and not _problems(arch, hpz.with_fused(True), cluster, batch, result.device, attention))
    return [f"ZeRO++ hpZ ({key}) would help: {gain}. But it does not fit: {copies} add {extra / GiB:.1f} GiB per "
            f"rank, which more nodes do not shrink ({'; '.join(problems)})."
            + (" With `subzero.fused` true (no backups) it fits." if fused_fits else "")]


def _zo_bytes(arch: Architecture, zero: ZeroSettings, cluster: Cluster, batch: BatchShape, attention: str) -> float:
    """GPU + CPU bytes per rank of the ZO step (two of these differ by what a setting adds)."""
    items, _ = zo_items(arch, zero, cluster, batch, "cuda", attention)
    return sum(i.gpu + i.cpu for i in items)


def _fused_modelled(method: MethodSpec) -> bool:
    """Whether the planner models the fused ± pass for ``method``: fusable, with low-rank side paths."""
    return method.fusable and method.subspace_rank is not None
