"""Rendering: one run's itemised report, the published prediction table (``subzero-memory --table``) and
the step-time table (``subzero-memory --table time``)."""

from __future__ import annotations

from dataclasses import replace

from ..config import SubZeroConfig
from .architectures import BUILTIN_MODELS
from .estimate import Estimate, estimate
from .settings import GiB, BatchShape, Cluster, Offload, ZeroSettings
from .step_time import StepTime


def render_report(result: Estimate) -> str:
    """The itemised table, the verdict and the advice of ``result``, as text."""
    a, z, c, b = result.architecture, result.zero, result.cluster, result.batch
    mode = "fused [B;B]" if z.fused else "in-place"
    method = z.subzero.method + ("" if z.subspace_rank is None else f" (rank {z.subspace_rank})")
    lines = [
        f"Model {a.name}: {a.total_params / 1e9:.3f}B parameters ({a.family}, hidden {a.hidden}, {a.layers} layers, "
        f"ffn {a.ffn}, {a.heads} heads, vocab {a.vocab}, {'tied' if a.tied else 'untied'} embeddings)",
        f"ZeRO-3, {z.precision}, offload_param={z.offload.value}, {method}, {mode}; "
        f"{c.nodes} node(s) × {c.gpus_per_node} GPU(s) = {c.world} ranks; batch {b.batch_size} × {b.seq_len} "
        f"tokens per rank; device={result.device}",
        "",
        f"{'per rank, GiB':<52}{'GPU':>9}{'CPU':>9}{'NVMe':>9}",
    ]
    for item in result.items:
        lines.append(f"  {item.name:<50}{item.gpu / GiB:>9.2f}{item.cpu / GiB:>9.2f}{item.nvme / GiB:>9.2f}")
    lines.append(f"  {'ZO total':<50}" + "".join(f"{result.total(t) / GiB:>9.2f}" for t in ("gpu", "cpu", "nvme")))
    lines.append(f"  (GPU peak reached at: {result.peak_moment})")
    lines.append("")
    lines.append("first-order AdamW, same ZeRO-3 setting (DeepSpeed's model-state estimate + backward activations):")
    for item in result.first_order:
        lines.append(f"  {item.name:<50}{item.gpu / GiB:>9.2f}{item.cpu / GiB:>9.2f}{item.nvme / GiB:>9.2f}")
    lines.append(
        f"  {'AdamW total':<50}" + "".join(f"{result.total(t, True) / GiB:>9.2f}" for t in ("gpu", "cpu", "nvme"))
    )
    lines.append("")
    capacity = f"{c.gpu_memory_gib:g} GiB per GPU, {c.cpu_memory_gib:g} GiB CPU per node" + (
        f", {c.nvme_gib:g} GiB NVMe per node" if c.nvme_gib is not None else ""
    )
    lines.append(f"ZO: {'fits' if result.fits else 'does NOT fit'} ({capacity}).")
    lines.extend(f"  - {p}" for p in result.problems)
    if result.advice:
        lines.append("To make it fit:")
        lines.extend(f"  - {a}" for a in result.advice)
    lines.append(f"First-order AdamW: {'fits' if result.first_order_fits else 'does not fit'}.")
    if result.step is not None:
        lines.extend(["", *_step_time_lines(result.step, c, z.hpz_group(c.world) > 1)])
    if result.speed_advice:
        lines.append("To make it faster:")
        lines.extend(f"  - {a}" for a in result.speed_advice)
    return "\n".join(lines)


def _step_time_lines(t: StepTime, c: Cluster, hpz: bool) -> list[str]:
    """The step time's terms (``step_time.py``'s model), and hpZ's first forward and replicas."""
    link = "the network" if t.across_node_bytes else "NVLink"
    lines = [
        "Step time, steady state (gathers at the link rate + matmuls at the sustained rate, not overlapped: an "
        "upper bound for these rates):",
        f"  {t.gathers} parameter all-gather{'s' if t.gathers > 1 else ''} per step over {t.group} ranks "
        f"({'an hpZ group' if hpz else 'plain ZeRO-3'}), each {t.within_node_bytes / GiB:.2f} GiB per GPU from its "
        f"node + {t.across_node_bytes / GiB:.2f} GiB across nodes, at {t.link_gbps:g} Gbit/s ({link})",
        f"  comm {t.comm_s:.2f} s + compute {t.compute_s:.2f} s ({c.tflops:g} TFLOP/s) = {t.total_s:.2f} s per step",
    ]
    if hpz and c.nodes > 1:
        lines.append(f"  across nodes per step: {t.across_node_bytes_per_step:g} bytes (the loss all-reduce) after the "
                     f"first forward, which gathers {t.first_across_node_bytes / GiB:.2f} GiB per GPU from the primary "
                     "shards, once")
    if t.replicas > 1:
        lines.append(f"  replica-mode perturbation: {t.replicas} groups of {t.group} GPUs each hold the model, so "
                     f"{t.replicas} directions per step in this time (+ one all-reduce of {t.replicas} loss pairs)")
    return lines


TABLE_MODELS = ("opt-13b", "opt-30b", "opt-66b", "opt-175b", "llama-2-70b")
TABLE_NODES = (1, 2, 4, 8)


def prediction_table(batch: BatchShape = BatchShape(4, 512), precision: str = "bf16", gpu_gib: float = 80.0,
                     cpu_gib: float = 1024.0, gpus_per_node: int = 8, rank: int = 24) -> str:  # fmt: skip
    """Markdown: GPU GiB per rank (CPU GiB per node) for ZO in-place, ZO fused and AdamW, ✗ where it does not fit."""
    lines = [
        f"Per-rank GPU GiB / per-node CPU GiB; {gpus_per_node} × {gpu_gib:g} GiB GPUs and {cpu_gib:g} GiB CPU per node; "
        f"{precision}, batch {batch.batch_size} × {batch.seq_len} tokens per GPU, SubZero rank {rank}, SDPA, ZeRO-3 "
        "defaults (prefetch 5e7, persistence 1e5). ✗ = does not fit.",
        "",
        "| model | params | nodes | offload | ZO in-place | ZO fused | AdamW (first-order) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in TABLE_MODELS:
        arch = BUILTIN_MODELS[name]
        for nodes in TABLE_NODES:
            cluster = Cluster(nodes, gpus_per_node, gpu_gib, cpu_gib)
            for offload in (Offload.NONE, Offload.CPU):
                cells = []
                for fused in (False, True):
                    # The published table is SubZero's (its first line says so).
                    subzero = SubZeroConfig.from_section({"method": "subzero", "rank": rank, "fused": fused})
                    settings = ZeroSettings(precision=precision, offload=offload, subzero=subzero)
                    e = estimate(arch, settings, cluster, batch)
                    cells.append(_cell(e.total("gpu"), e.total("cpu") * gpus_per_node, e.fits))
                cells.append(_cell(e.total("gpu", True), e.total("cpu", True) * gpus_per_node, e.first_order_fits))
                lines.append(f"| {name} | {arch.total_params / 1e9:.1f}B | {nodes} | {offload.value} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TIME_TABLE_MODELS = ("opt-13b", "opt-30b", "opt-66b", "opt-175b")
TIME_TABLE_NODES = (1, 2, 4, 8, 16)


def step_time_table(cluster: Cluster = Cluster(), batch: BatchShape = BatchShape(4, 512), precision: str = "bf16",
                    fused: bool = False, rank: int = 24) -> str:  # fmt: skip
    """Markdown: plain ZeRO-3 against hpZ (K = GPUs per node) for OPT-13B … 175B on 1 … 16 nodes of ``cluster``.

    Per row: GPU GiB per rank (✗ where it does not fit), what one forward's gather brings each GPU
    from its node and across nodes, and the step time's terms (``step_time.py``).
    """
    k, mode = cluster.gpus_per_node, "fused (1 gather per step)" if fused else "in place (2 gathers per step)"
    lines = [
        f"SubZero rank {rank}, {mode}, {precision}, batch {batch.batch_size} × {batch.seq_len} tokens per GPU; "
        f"nodes of {k} × {cluster.gpu_memory_gib:g} GiB GPUs, {cluster.intra_node_gbps:g} Gbit/s NVLink and "
        f"{cluster.inter_node_gbps:g} Gbit/s network per GPU, {cluster.tflops:g} TFLOP/s. hpZ rows: "
        f"`zero_hpz_partition_size` {k}, gathers after the first forward. Step = comm + compute, not overlapped. "
        "✗ = does not fit.",
        "",
        "| model | params | nodes | ZeRO-3 | GPU GiB/rank | gather/forward, node GiB | gather/forward, "
        "across nodes GiB | comm s | compute s | step s | directions/step (replica mode) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    subzero = SubZeroConfig.from_section({"method": "subzero", "rank": rank, "fused": fused})
    for name in TIME_TABLE_MODELS:
        arch = BUILTIN_MODELS[name]
        for nodes in TIME_TABLE_NODES:
            for hpz in (1, k):
                settings = ZeroSettings(precision=precision, hpz_partition_size=hpz, subzero=subzero)
                e = estimate(arch, settings, replace(cluster, nodes=nodes), batch)
                t = e.step
                lines.append(
                    f"| {name} | {arch.total_params / 1e9:.1f}B | {nodes} | {'hpZ' if hpz > 1 else 'plain'} | "
                    f"{e.total('gpu') / GiB:.1f}{'' if e.fits else ' ✗'} | {t.within_node_bytes / GiB:.1f} | "
                    f"{t.across_node_bytes / GiB:.1f} | {t.comm_s:.2f} | {t.compute_s:.2f} | {t.total_s:.2f} | "
                    f"{t.replicas} |"
                )
    return "\n".join(lines) + "\n"


def _cell(gpu: float, cpu_node: float, fits: bool) -> str:
    return f"{gpu / GiB:,.1f} / {cpu_node / GiB:,.0f}" + ("" if fits else " ✗")
