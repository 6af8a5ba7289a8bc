"""Peak memory of a ZO step vs a first-order DeepSpeed ZeRO-3 AdamW step (2-rank ZeRO-3, CPU).

Run from the repository root:

    deepspeed --num_gpus 2 bench/memory_vs_first_order.py

Same model, batch and precision for every row; each configuration runs in a fresh pair of worker
processes (the workers of ``bench/harness/steps.py``), so its peak RSS covers only its own life: imports,
model creation (partitioned by ZeRO-3 at construction), engine initialization, one warm-up step
and the measured step(s). Every figure is counted above the RSS the same process had right
after its imports (Python, torch, transformers and DeepSpeed cost the same in every row).

- **ZO in-place / fused**: ``subzero_ds.initialize`` with ``"fused": false`` / ``true``;
- **first-order**: plain DeepSpeed, ``deepspeed.initialize`` with an ``"optimizer"`` block
  (AdamW with ``torch_adam``: DeepSpeed's fused Adam needs CUDA and its CPU Adam is only picked
  with offload) and ``"zero_force_ds_cpu_optimizer": false``; a step is forward, ``backward``
  (ZeRO-3 reduce-scatters the gradients into fp32 partitions) and ``step``. Dropout is off in
  every row (eval mode), so the only difference is what the step keeps.

Options are ``bench/step_cost.py``'s (``bench/harness/steps.py``), with other defaults: ``--model opt``, ``--dtype fp32 bf16``,
``--method subzero first-order``, ``--mode in-place fused``, ``--batch-size 16``, ``--steps 1``,
``--warmup 1``, the plain-forward timing skipped; ``--output bench/results/memory_vs_first_order.md``.
Target of the issue: ZO ≤ 0.35× first-order (on GPUs also reported for peak GPU memory). When MeZO
is among the methods, each row is also given against MeZO's peak (same model, dtype and mode): the
memory of the method family (e.g. ``--method subzero mezo subzero-adam mezo-adam hizoo first-order``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from harness.report import command_line, device_note, per_rank
from harness.steps import FIRST_ORDER, Row, method_label, models_note, parse_args as parse_step_args, run_all
from harness.workers import run_launched


TARGET = 0.35


def parse_args() -> argparse.Namespace:
    """``bench/step_cost.py``'s options with this benchmark's defaults."""
    return parse_step_args(
        description=__doc__.split("\n\n")[0], model=["opt"], method=["subzero", FIRST_ORDER], batch_size=16,
        steps=1, warmup=1, no_forwards=True, output=Path("bench/results/memory_vs_first_order.md"),
    )  # fmt: skip


def allocator_note() -> str:
    """The workers inherit the environment: say whether glibc returns freed blocks to the OS."""
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if threshold:
        return (f"glibc with `MALLOC_MMAP_THRESHOLD_={threshold}` in every row (freed blocks above it go back to "
                "the OS, so RSS tracks live tensors, as GPU memory would).")
    return "glibc as shipped (freed blocks up to its adaptive mmap threshold, ≤ 32 MiB, may stay in the heap)."


def gpu_memory_ratios(rows: list[Row]) -> list[str]:
    """On GPUs: each ZO configuration's peak GPU memory ÷ first-order AdamW's (same target)."""
    first = {(r.configuration.model, r.configuration.dtype): max(r.peak_gpu_mib) for r in rows
             if r.configuration.method == FIRST_ORDER and any(r.peak_gpu_mib)}
    ratios = [f"{c.model} {c.dtype} {c.method} {c.mode} {max(r.peak_gpu_mib) / first[c.model, c.dtype]:.3f}×"
              for r in rows if (c := r.configuration).method != FIRST_ORDER and (c.model, c.dtype) in first]
    return ["", f"Peak GPU memory, ZO ÷ first-order AdamW (target ≤ {TARGET}): " + ", ".join(ratios) + "."] if ratios else []


def markdown_report(rows: list[Row], args: argparse.Namespace, world_size: int, wall_s: float) -> str:
    """The table: peak RSS above imports per rank, and each ZO row against first-order of the same model and dtype."""
    first_order = {(r.configuration.model, r.configuration.dtype): r for r in rows if r.configuration.method == FIRST_ORDER}
    mezo = {(c.model, c.dtype, c.mode): r.max_above_imports_mib for r in rows if (c := r.configuration).method == "mezo"}
    lines = [
        "# Peak memory: ZO step vs first-order DeepSpeed ZeRO-3 AdamW step",
        "",
        f"Command: `{command_line(world_size, 'bench/memory_vs_first_order.py')}`",
        "",
        f"Models (random weights): {models_note(rows)} ZeRO-3 over {world_size} ranks, {device_note()}, "
        f"{args.threads} torch thread(s) per rank. Batch {args.batch_size} × {args.seq_len} tokens per rank, "
        f"{args.warmup} warm-up + {args.steps} measured step(s) per fresh worker process. "
        f"Wall time {wall_s / 60:.1f} min. Allocator: {allocator_note()}",
        "",
        "| model | dtype | method | mode | step s | peak RSS MiB per rank | above imports MiB per rank "
        "| peak once built, above imports | ÷ first-order (larger rank) |" + (" ÷ MeZO |" if mezo else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if mezo else ""),
    ]
    verdicts = []
    for r in rows:
        c = r.configuration
        reference = first_order.get((c.model, c.dtype))
        ratio = r.max_above_imports_mib / reference.max_above_imports_mib if reference else float("nan")
        built = [b - a for b, a in zip(r.built_peak_rss_mib, r.rss_after_imports_mib)]
        versus_mezo = mezo.get((c.model, c.dtype, c.mode or "in-place"))
        lines.append(
            f"| {c.model} | {c.dtype} | {method_label(c)} | {c.mode or '—'} | {r.step_s:.2f} "
            f"| {per_rank(r.peak_rss_mib)} | {per_rank(r.above_imports_mib)} | {per_rank(built)} | **{ratio:.3f}** |"
            + (f" {r.max_above_imports_mib / versus_mezo:.2f} |" if versus_mezo else " — |" if mezo else "")
        )
        if c.method != FIRST_ORDER and reference:
            verdicts.append(f"{c.model} {c.dtype} {c.method} {c.mode} {ratio:.3f}× ({'met' if ratio <= TARGET else 'missed'})")
    lines += [
        "",
        f"Target: ZO ≤ {TARGET}× first-order: {', '.join(verdicts) or 'no pair run'}.",
        *gpu_memory_ratios(rows),
        "",
        "Peak RSS is `ru_maxrss` of each rank's worker process at its end; 'above imports' subtracts the RSS that "
        f"process had right after its imports ({per_rank(rows[0].rss_after_imports_mib)} MiB for the first row). "
        "'Peak once built' is the peak reached by the end of engine initialization, before any step. The ratio "
        "compares the larger rank of each row. 'step s' is the median step time of the slower rank "
        f"(other CPU load during the steps: up to {max(r.other_load for r in rows):.0%}; these timings are "
        "incidental here, see `bench/step_cost.py` for careful ones).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run every configuration in fresh workers; rank 0 prints the report and writes it."""
    args = parse_args()
    run_launched(args, run_all, markdown_report, "memory_vs_first_order")


if __name__ == "__main__":
    main()
