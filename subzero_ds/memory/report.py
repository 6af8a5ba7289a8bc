"""Rendering: one run's itemised report, and the published prediction table (``subzero-memory --table``)."""

from __future__ import annotations

from ..config import SubZeroConfig
from .architectures import BUILTIN_MODELS
from .estimate import Estimate, estimate
from .settings import GiB, BatchShape, Cluster, Offload, ZeroSettings


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
    return "\n".join(lines)


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


def _cell(gpu: float, cpu_node: float, fits: bool) -> str:
    return f"{gpu / GiB:,.1f} / {cpu_node / GiB:,.0f}" + ("" if fits else " ✗")
