"""Claim: a ZO step costs about two plain forward passes (SubZero: in place ≤ 1.15×, fused ≤ 1.0×).

Run from the repository root (2 ranks, ZeRO-3, DeepSpeed picks its CPU accelerator and gloo):

    deepspeed --num_gpus 2 bench/step_cost.py

Options (``bench/harness/steps.py``): ``--model opt llama`` (and ``opt-tiny`` for smoke tests,
``opt-7m opt-30m opt-350m opt-1.3b``), ``--dtype fp32 bf16``, ``--method subzero mezo …`` (every
registered method and update rule, e.g. ``subzero-adam``, and ``first-order``: plain DeepSpeed
ZeRO-3 with AdamW), ``--mode in-place fused``, ``--batch-size 8``, ``--seq-len 128``, ``--steps 3``,
``--warmup 1``, ``--threads N`` (per rank), ``--tuning full|lora``, ``--output
bench/results/step_cost.md`` (a ``.json`` of the rows is written next to it after every
configuration). If port 29500 is taken, add ``--master_port <free port>`` after ``--num_gpus 2``.
The default batch is 8 × 128 tokens per rank, not 16 × 128: on 2 CPU cores each 125M
configuration takes about 1.3 minutes with 16 rows (``--batch-size 16``, as in BENCHMARKS.md).

For every (model, dtype, method, mode), with random weights partitioned by ZeRO-3 as the model is
created (never whole on a rank), SDPA attention, no KV cache, in a fresh pair of worker processes:

- **step s**: the median time of one ``engine.step(batch)``. In place (``"fused": false``): back θ
  up, perturb +, forward, perturb −, forward, all-reduce of the losses, update. Fused (``"fused":
  true``): one forward over [B; B] with the ± side paths, the all-reduce, the update;
- **2×forward s**: two plain forwards of the loss the step computes (the engine's default LM loss,
  scored inside the LM head) on the same engine and batch: the floor of a two-point ZO step;
- **ratio**: step ÷ 2×forward; a method whose step takes another number of forwards (HiZOO's ℓ0,
  ℓ+, ℓ−: the registry's ``forwards_per_step``) is also given against that many forwards;
- **where the time goes**: the step's phases as the engine names them (``subzero_ds.phases``,
  read with ``subzero_ds.phases.recorded()``; rank 0), and one pass of direction generation alone.

Step and forward measurements alternate (step first on even iterations, forwards first on odd
ones), so drift hits both alike; each timing starts after a barrier and an iteration counts as the
slower rank. An iteration during which other processes used more than ``--max-other-load`` (10%)
of the CPU is measured again (at most ``--max-repeats`` times). The same runs' other quantities
are other claims, with their own scripts: all-gathered bytes (``bench/gather_bytes.py``), peak
memory (``bench/memory_vs_first_order.py``), growth with model size (``bench/scaling.py``).
"""

from __future__ import annotations

import argparse

from harness.report import heading, table
from harness.steps import (
    BREAKDOWN,
    DEFAULT_BATCH_SIZE,
    FIRST_ORDER,
    Row,
    load_note,
    method_label,
    parse_args,
    run_all,
    setup_note,
)
from harness.workers import run_launched


TARGET_RATIO = {"in-place": 1.15, "fused": 1.0}  # SubZero step ÷ two plain forwards


def batch_note(batch_size: int) -> str:
    """Why the default batch is what it is, when the run uses it."""
    if batch_size != DEFAULT_BATCH_SIZE:
        return ""
    return (
        "The batch is the default, lowered from 16 × 128: with 16 rows the whole benchmark takes about 10 min on "
        "2 CPU cores instead of about 4.5; `--batch-size 16` gives it back."
    )


def spread(value: float, values: tuple[float, float]) -> str:
    """A median and its min–max over the measured iterations."""
    return f"{value:.2f} [{values[0]:.2f}–{values[1]:.2f}]"


def cost_table(rows: list[Row]) -> list[str]:
    """One row per configuration: step, two forwards, their ratio, and the ratio to the method's forward limit."""
    return table(
        ["model", "dtype", "method", "mode", "step s", "2×forward s", "ratio", "forwards per step",
         "step ÷ its forwards", "other CPU load (repeats)"],
        [[c.model, c.dtype, method_label(c), c.mode or "—", spread(r.step_s, r.step_spread),
          spread(r.forward2_s, r.forward2_spread), f"**{r.ratio:.3f}**", str(r.forwards),
          f"{r.limit_ratio:.3f}" if c.method != FIRST_ORDER else "—", f"{r.other_load:.0%} ({r.repeated})"]
         for r in rows if (c := r.configuration)],
    )  # fmt: skip


def phase_table(rows: list[Row]) -> list[str]:
    """One row per ZO configuration measured: rank 0's median seconds per phase of the step."""
    return table(
        ["model", "dtype", "method", "mode", "step", *BREAKDOWN, "direction generation, one pass"],
        [[c.model, c.dtype, c.method, c.mode, f"{r.rank0_step_s:.2f}", *(f"{r.phases_s[name]:.3f}" for name in BREAKDOWN),
          f"{r.direction_s:.3f}"] for r in rows if (c := r.configuration).method != FIRST_ORDER],
    )  # fmt: skip


def verdicts(rows: list[Row], args: argparse.Namespace) -> str:
    """SubZero's ratios against their targets."""
    met = [f"{c.model} {c.dtype} {c.mode} {r.ratio:.3f}× (target ≤ {TARGET_RATIO[c.mode]}: "
           f"{'met' if r.ratio <= TARGET_RATIO[c.mode] else 'missed'})"
           for r in rows if (c := r.configuration).method == "subzero" and not args.no_forwards]
    return "Targets, SubZero step ÷ two plain forwards: " + (", ".join(met) or "SubZero not run (or forwards not timed)") + "."


def markdown_report(rows: list[Row], args: argparse.Namespace, world_size: int, wall_s: float) -> str:
    """The cost table with its targets, then the phase table, each with how it was measured."""
    lines = [
        *heading("ZO step cost vs. two plain forward passes", world_size, "bench/step_cost.py",
                 setup_note(rows, args, world_size, wall_s) + (" " + batch_note(args.batch_size)).rstrip()),
        *cost_table(rows),
        "",
        verdicts(rows, args),
        "",
        "'Forwards per step' is the registry's `forwards_per_step` of the method (HiZOO: ℓ0, ℓ+, ℓ−); 'step ÷ its "
        "forwards' compares the step with that many plain forwards. " + load_note(args),
        "",
        "## Where the step time goes (rank 0, median seconds per step)",
        "",
        *phase_table(rows),
        "",
        "The phases are the engine's own (`subzero_ds.phases`; `subzero::<name>` ranges in a torch profiler trace), "
        "summed over the step: 'forward' are the probes' loss forwards (fused: one forward over the doubled batch "
        "[B; B] per query, with its side paths); 'backup' (in place) copies θ; 'perturb', 'restore' (in place) and "
        "'update' each regenerate the direction and write the shard; 'cache release' drops ZeRO-3's stale gathered "
        "copies inside the write that left them (already counted in that write); 'all-reduce' is the one "
        "all-reduce of the losses, which waits for the slower rank; 'other' is the rest of rank 0's step. "
        "'Direction generation, one pass' times generating this rank's slice of D_t alone, once, without writing it.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Entry point of the launched process (one per rank); the workers run ``harness.step_worker``."""
    args = parse_args(description=__doc__.split("\n\n")[0])
    run_launched(args, run_all, markdown_report, "step_cost")


if __name__ == "__main__":
    main()
