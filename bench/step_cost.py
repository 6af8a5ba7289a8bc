"""Cost of one zeroth-order step against its limit, two plain forward passes (2-rank ZeRO-3, CPU).

Run from the repository root (2 ranks, ZeRO-3, DeepSpeed picks its CPU accelerator and gloo):

    deepspeed --num_gpus 2 bench/step_cost.py

Options: ``--model opt llama`` (and the scaling sizes ``opt-7m opt-30m opt-350m``, ``opt-tiny``
for smoke tests), ``--dtype fp32 bf16``, ``--method subzero mezo first-order``, ``--mode in-place
fused``, ``--batch-size 8``, ``--seq-len 128``, ``--steps 3``, ``--warmup 1``, ``--threads N`` (per
rank), ``--no-forwards`` (time the step alone), ``--output bench/results/step_cost.md`` (a ``.json``
of the rows is written next to it after every configuration).
If port 29500 is taken, add ``--master_port <free port>`` after ``--num_gpus 2``.
The default batch is 8 × 128 tokens per rank, not 16 × 128: on 2 CPU cores each 125M
configuration takes about 1.3 minutes with 16 rows (``--batch-size 16``, as in BENCHMARKS.md).

What it measures, for every (model, dtype, method, mode), with random weights partitioned by
ZeRO-3 as the model is created (never whole on a rank), SDPA attention, no KV cache:

- **step s**: the median time of one ``engine.step(batch)``. In-place mode (``"fused": false``):
  save a backup of the shard, perturb +, forward, perturb −, forward, all-reduce of the two
  losses, update, cache release. Fused mode (``"fused": true``): one forward over [B; B] with the
  ± side paths, the all-reduce, the update. ``first-order``: plain DeepSpeed ZeRO-3 with AdamW
  (forward, ``backward``, ``step``), the baseline of bench/memory_vs_first_order.py and
  bench/scaling.py;
- **2×forward s**: the median time of two plain forwards of the step's loss (the engine's default LM
  loss, scored inside the LM head) under ``torch.no_grad()`` on the same engine, model and batch:
  the floor for any two-point ZO method;
- **ratio**: step / 2×forward (targets for SubZero: in-place ≤ 1.15, fused ≤ 1.0);
- **all-gathered bytes** per step (and per forward pair), counted by wrapping the collectives of
  DeepSpeed's communication backend and of ``torch.distributed`` in the worker while the step
  runs (:class:`CollectiveCounter`); the report gives fused ÷ in-place (target ≤ 0.55);
- **peak RSS** per rank, the part of it above the RSS right after the imports, and the peak
  already reached when the model is built and the engine initialized.

Step and forward measurements alternate (step first on even iterations, forwards first on odd
ones), so drift hits both alike. Each timing starts after a barrier; an iteration counts as
the slower of the two ranks. The benchmark watches the host's CPU: an iteration during which
other processes used more than ``--max-other-load`` (10%) of it is measured again (at most
``--max-repeats`` times), and the table reports the worst remaining load, so a run disturbed by
other work says so. A second table splits the step into the phases the engine names
(``subzero_ds.phases``, rank 0) and times one pass of direction generation alone over this
rank's shards (no write).

Every configuration runs in a fresh pair of worker processes (one per rank, started by the
launched processes), so its peak RSS covers only its own life: imports, model creation, engine
initialization, warm-up and the measured iterations, and no earlier configuration.
"""

from __future__ import annotations

import argparse

import torch.distributed as dist
from harness.report import command_line, device_note, per_rank, publish
from harness.methods import method_spec
from harness.steps import (
    BREAKDOWN,
    DEFAULT_BATCH_SIZE,
    FIRST_ORDER,
    Configuration,
    Row,
    method_label,
    models_note,
    parse_args,
    run_all,
)
from harness.workers import exit_cleanly, run_or_exit, show_progress, wall_seconds

from subzero_ds.distributed import init_distributed

# Targets of the issue: SubZero step / two plain forwards, and fused / in-place all-gathered bytes.
TARGET_RATIO = {"in-place": 1.15, "fused": 1.0}
TARGET_GATHER_RATIO = 0.55


def gpu_memory_ratios(rows: list[Row]) -> list[str]:
    """On GPUs: each ZO configuration's peak GPU memory ÷ first-order AdamW's (target ≤ 0.35)."""
    first = {(r.configuration.model, r.configuration.dtype): max(r.peak_gpu_mib) for r in rows
             if r.configuration.method == FIRST_ORDER and any(r.peak_gpu_mib)}
    ratios = [f"{c.model} {c.dtype} {c.method} {c.mode} {max(r.peak_gpu_mib) / first[c.model, c.dtype]:.3f}×"
              for r in rows if (c := r.configuration).method != FIRST_ORDER and (c.model, c.dtype) in first]
    return ["", "Peak GPU memory, ZO ÷ first-order AdamW (target ≤ 0.35): " + ", ".join(ratios) + "."] if ratios else []


def memory_vs_mezo(rows: list[Row]) -> list[str]:
    """Each configuration's peak RSS above imports ÷ MeZO's (same model, dtype and mode), when MeZO ran."""
    mezo = {(r.configuration.model, r.configuration.dtype, r.configuration.mode): r.max_above_imports_mib
            for r in rows if r.configuration.method == "mezo"}
    ratios = [f"{c.method} {c.mode or ''} {r.max_above_imports_mib / mezo[c.model, c.dtype, c.mode]:.3f}×".replace("  ", " ")
              for r in rows if (c := r.configuration).method != "mezo" and (c.model, c.dtype, c.mode) in mezo]
    lines = ["", "Peak RSS above imports ÷ MeZO's (same model, dtype, mode): " + ", ".join(ratios) + "."] if ratios else []
    more = [f"{c.method} {r.ratio * 2 / forwards:.3f} ({forwards} forwards)" for r in rows
            if (c := r.configuration).method != FIRST_ORDER and (forwards := method_spec(c.method).forwards_per_step()) != 2
            and r.forward2_s == r.forward2_s]
    if more:
        lines += ["", "Methods whose step takes other than two forwards (the registry's forwards_per_step), "
                  "step ÷ that many plain forwards: " + ", ".join(more) + "."]
    return lines



def batch_note(batch_size: int) -> str:
    """Why the default batch is what it is, when the run uses it."""
    if batch_size != DEFAULT_BATCH_SIZE:
        return ""
    return (
        " (the default, lowered from 16 × 128: with 16 rows the whole benchmark takes about 10 min on 2 CPU "
        "cores instead of about 4.5; `--batch-size 16` gives it back)"
    )



def gather_ratios(rows: list[Row]) -> list[tuple[Configuration, float, float, float]]:
    """(fused configuration, in-place MiB, fused MiB, fused / in-place) for every pair run."""
    by_key = {(r.configuration.model, r.configuration.dtype, r.configuration.method, r.configuration.mode): r for r in rows}
    pairs = []
    for r in rows:
        c = r.configuration
        in_place = by_key.get((c.model, c.dtype, c.method, "in-place"))
        if c.mode == "fused" and in_place is not None and in_place.gathered_mib > 0:
            pairs.append((c, in_place.gathered_mib, r.gathered_mib, r.gathered_mib / in_place.gathered_mib))
    return pairs


def markdown_report(rows: list[Row], args: argparse.Namespace, world_size: int, wall_s: float) -> str:
    """The results as Markdown: the main table, communication, the phase breakdown and how they were measured."""
    verdicts = [
        f"{r.configuration.model} {r.configuration.dtype} {r.configuration.mode} {r.ratio:.3f}× "
        f"(target ≤ {TARGET_RATIO[r.configuration.mode]}: {'met' if r.ratio <= TARGET_RATIO[r.configuration.mode] else 'missed'})"
        for r in rows
        if r.configuration.method == "subzero" and not args.no_forwards
    ]
    lines = [
        "# ZO step cost vs. two plain forward passes",
        "",
        f"Command: `{command_line(world_size)}`",
        "",
        f"Tuning: {args.tuning}. Models (random weights): {models_note(rows)} ZeRO-3 over "
        f"{world_size} ranks, {device_note()}, {args.threads} torch thread(s) per rank, SDPA, no KV cache. "
        f"Batch {args.batch_size} × {args.seq_len} tokens per rank{batch_note(args.batch_size)}. "
        f"{args.warmup} warm-up + {args.steps} measured iterations; step and 2×forward interleaved, each timed "
        "after a barrier; per iteration the slower rank; median over iterations (min–max in brackets). "
        f"Wall time {wall_s / 60:.1f} min (rank 0, from its start to this report).",
        "",
        "| model | dtype | method | mode | step s | 2×forward s | ratio | all-gathered MiB per step | "
        "… per 2×forward | peak RSS MiB per rank | above imports MiB per rank "
        "| peak once built MiB per rank | peak GPU MiB per rank | other CPU load (repeats) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r.configuration
        lines.append(
            f"| {c.model} | {c.dtype} | {method_label(c)} | {c.mode or '—'} "
            f"| {r.step_s:.2f} [{r.step_spread[0]:.2f}–{r.step_spread[1]:.2f}] "
            f"| {r.forward2_s:.2f} [{r.forward2_spread[0]:.2f}–{r.forward2_spread[1]:.2f}] | **{r.ratio:.3f}** "
            f"| {r.gathered_mib:,.0f} | {r.forward2_gathered_mib:,.0f} "
            f"| {per_rank(r.peak_rss_mib)} | {per_rank(r.above_imports_mib)} | {per_rank(r.built_peak_rss_mib)} "
            f"| {per_rank(r.peak_gpu_mib) if any(r.peak_gpu_mib) else '—'} | {r.other_load:.0%} ({r.repeated}) |"
        )
    lines += [
        "",
        "Targets, SubZero step ÷ two plain forwards: "
        + (", ".join(verdicts) or "SubZero not run (or forwards not timed)") + ".",
        *memory_vs_mezo(rows),
        *gpu_memory_ratios(rows),
        "",
        "## Communication: bytes all-gathered per step",
        "",
        "| model | dtype | method | in-place MiB per step | fused MiB per step | fused ÷ in-place |",
        "|---|---|---|---|---|---|",
    ]
    for c, in_place, fused, ratio in gather_ratios(rows):
        verdict = "met" if ratio <= TARGET_GATHER_RATIO else "missed"
        lines.append(f"| {c.model} | {c.dtype} | {c.method} | {in_place:,.0f} | {fused:,.0f} "
                     f"| **{ratio:.3f}** ({verdict}) |")
    lines += [
        "",
        f"Target: fused ≤ {TARGET_GATHER_RATIO}× in-place. Counted per rank by wrapping the all-gathers of "
        "DeepSpeed's communication backend and of `torch.distributed` in the worker while a step (or a forward "
        "pair) runs; an all-gather counts its whole output tensor (the full parameter that lands on the rank), so "
        "a rank receives (world − 1)/world of it over the wire. The largest value over ranks and measured steps. "
        "ZeRO-3 keeps parameters below its persistence threshold gathered, so they do not show up.",
        "",
        "Peak RSS (`ru_maxrss`) covers the whole life of a fresh worker process per configuration: imports, "
        "model creation (partitioned at construction), engine initialization, warm-up and every measured "
        "step and forward pair. 'Above imports' subtracts the RSS right after the imports "
        f"({per_rank(rows[0].rss_after_imports_mib)} MiB for the first configuration); 'peak once built' is the "
        "peak reached by the end of engine initialization, before any forward pass. 'Other CPU load' is the "
        "largest share of the host's CPU time used by processes other than the benchmark's workers during a "
        f"measured iteration; an iteration above {args.max_other_load:.0%} was measured again (repeats in "
        "brackets, at most `--max-repeats`). If it is still more than a few percent, something else competed "
        "for the cores and the timings are suspect: run again on a quiet machine.",
        "",
        "## Where the step time goes (rank 0, median seconds per step)",
        "",
        "| model | dtype | method | mode | step | " + " | ".join(BREAKDOWN) + " | direction generation, one pass |",
        "|---|---|---|---|---|" + "---|" * (len(BREAKDOWN) + 1),
    ]
    for r in rows:
        c = r.configuration
        if c.method == FIRST_ORDER:
            continue
        phases = " | ".join(f"{r.phases_s[name]:.3f}" for name in BREAKDOWN)
        lines.append(f"| {c.model} | {c.dtype} | {c.method} | {c.mode} | {r.rank0_step_s:.2f} | {phases} "
                     f"| {r.direction_s:.3f} |")
    lines += [
        "",
        "The phases are the engine's own (`subzero_ds.phases`, also `subzero::<name>` ranges in a torch profiler "
        "trace), summed over the step: 'forward' are the probes' loss forwards (in fused mode: one forward over the "
        "doubled batch [B; B] per query, with its side paths); 'backup' (in place) copies θ; 'perturb', 'restore' "
        "(in place) and 'update' each regenerate the direction and write the shard; 'cache release' drops ZeRO-3's "
        "stale gathered copies, inside the write that left them (already counted in that write); 'all-reduce' is "
        "the one all-reduce of the losses, which waits for the slower rank; 'other' is the rest of rank 0's step. "
        "'Direction generation, one pass' times generating this rank's slice of D_t alone, once, without writing it.",
    ]
    return "\n".join(lines) + "\n"



def run_launched(args: argparse.Namespace) -> None:
    """Run every configuration, then rank 0 prints the report and writes it to ``--output``."""
    init_distributed()
    rows = run_all(args)
    if dist.get_rank() == 0:
        publish(markdown_report(rows, args, dist.get_world_size(), wall_seconds()), args.output, "step_cost")




def main() -> None:
    """Entry point of the launched process (one per rank); the workers run ``harness.steps``."""
    args = parse_args(description=__doc__.split("\n\n")[0])
    show_progress()
    run_or_exit(lambda: run_launched(args))
    exit_cleanly(0)


if __name__ == "__main__":
    main()
