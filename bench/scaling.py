"""How step time and peak memory grow with model size: ZO fused, ZO in-place, first-order (2-rank ZeRO-3, CPU).

Run from the repository root:

    deepspeed --num_gpus 2 bench/scaling.py

Four OPT-shaped sizes (``opt-7m``: hidden 128, 4 layers; ``opt-30m``: hidden 384, 6 layers;
``opt``: OPT-125M; ``opt-350m``: OPT-350M, hidden 1024, 24 layers; all with OPT's 50272-token
vocabulary, random weights) × three ways to train them: SubZero with the fused ± pass, SubZero
in place, and plain DeepSpeed ZeRO-3 with AdamW (forward, backward, step). Every configuration
runs in a fresh pair of workers (``bench/harness/steps.py``); a row's step time is the median over the
measured steps of the slower rank, its memory the larger rank's peak RSS above the RSS right
after its imports.

Options are ``bench/step_cost.py``'s (``bench/harness/steps.py``), with other defaults: ``--model opt-7m opt-30m opt opt-350m``,
``--dtype fp32``, ``--method subzero first-order``, ``--mode in-place fused``, ``--batch-size 4``
(not 16: on 2 CPU cores the 350M first-order rows would take too long), ``--steps 2``, ``--warmup 1``,
the plain-forward timing skipped; ``--output bench/results/scaling.md``. The plot goes next to it
(``scaling.png``). ``--plot-only`` redraws table and plot from the JSON of an earlier run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist
from harness.models import MODELS
from harness.report import command_line
from harness.steps import FIRST_ORDER, parse_args as parse_step_args, run_all
from harness.workers import exit_cleanly, run_or_exit, show_progress, wall_seconds

from subzero_ds.distributed import init_distributed, log

NAMES = {"subzero": "SubZero", "mezo": "MeZO"}  # how the legend spells a method (others: as --method does)


def series(configuration: dict[str, Any]) -> str:
    """The plot's and table's label of a configuration's series: 'ZO fused (SubZero)', 'first-order …'."""
    method, mode, dtype = configuration["method"], configuration["mode"], configuration["dtype"]
    label = "first-order ZeRO-3 AdamW" if method == FIRST_ORDER else f"ZO {mode} ({NAMES.get(method, method)})"
    return label + ("" if dtype == "fp32" else f", {dtype}")


def parse_args() -> argparse.Namespace:
    """``bench/step_cost.py``'s options with this benchmark's defaults, plus ``--plot-only``."""
    plot_only = "--plot-only" in sys.argv
    if plot_only:
        sys.argv.remove("--plot-only")
    args = parse_step_args(
        description=__doc__.split("\n\n")[0], model=["opt-7m", "opt-30m", "opt", "opt-350m"], dtype=["fp32"],
        method=["subzero", FIRST_ORDER], batch_size=4, steps=2, warmup=1, no_forwards=True,
        output=Path("bench/results/scaling.md"),
    )  # fmt: skip
    args.plot_only = plot_only
    return args


def points(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float, float]]]:
    """Per series label: (parameters, step s, MiB above imports on the larger rank), by size."""
    by_label: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        by_label.setdefault(series(r["configuration"]), []).append((r["total_params"], r["step_s"], max(r["above_imports_mib"])))
    return {label: sorted(values) for label, values in by_label.items()}


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Two log-log panels: step time vs parameters, peak RSS above imports vs parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, values in points(rows).items():
        params = [p / 1e6 for p, _, _ in values]
        style = {"marker": "o", "linestyle": "--" if "first-order" in label else "-"}
        time_axis.plot(params, [s for _, s, _ in values], label=label, **style)
        memory_axis.plot(params, [m for _, _, m in values], label=label, **style)
    for axis, ylabel in ((time_axis, "step time, s (slower rank)"), (memory_axis, "peak RSS above imports, MiB per rank")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("parameters, millions")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
    time_axis.legend()
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown_report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, wall_s: float | None) -> str:
    """One table, sizes down, methods across (step s and MiB above imports), and the plot."""
    by_size: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    labels: list[str] = []
    for r in rows:
        c = r["configuration"]
        label = series(c)
        labels += [label] if label not in labels else []
        by_size.setdefault((c["model"], r["total_params"]), {})[label] = r
    lines = [
        "# Scaling with model size: ZO fused, ZO in-place, first-order",
        "",
        f"Command: `{command}`",
        "",
        f"OPT-shaped models with random weights, ZeRO-3 over 2 ranks, CPU + gloo, {args.threads} torch thread(s) "
        f"per rank. Batch {args.batch_size} × {args.seq_len} tokens per rank, {args.warmup} warm-up + {args.steps} "
        "measured steps per fresh worker process pair"
        + (f"; wall time {wall_s / 60:.1f} min" if wall_s else "") + ". Step s: median over the measured steps of "
        "the slower rank. MiB: peak RSS above the RSS right after the imports, larger rank.",
        "",
        "| model | parameters | " + " | ".join(f"{label}: step s | MiB" for label in labels) + " | other CPU load |",
        "|---|---|" + "---|---|" * len(labels) + "---|",
    ]
    for (model, params), cells in sorted(by_size.items(), key=lambda item: item[0][1]):
        values = " | ".join(
            f"{cells[label]['step_s']:.2f} | {max(cells[label]['above_imports_mib']):,.0f}" if label in cells else "— | —"
            for label in labels
        )
        load = max(cells[label]["other_load"] for label in cells)
        lines.append(f"| {model} | {params / 1e6:.1f}M | {values} | {load:.0%} |")
    lines += [
        "",
        "Shapes: " + "; ".join(f"`{m}`: {MODELS[m].label}" for m in dict.fromkeys(r["configuration"]["model"] for r in rows)) + ".",
        "",
        f"![step time and peak memory vs parameters]({args.output.with_suffix('.png').name})",
    ]
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, wall_s: float | None) -> str:
    """The Markdown report and the plot next to it; returns the report."""
    report = markdown_report(rows, args, command, wall_s)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    title = f"OPT shapes, fp32, ZeRO-3 on 2 CPU ranks, batch {args.batch_size}×{args.seq_len} per rank"
    plot(rows, args.output.with_suffix(".png"), title)
    return report


def main() -> None:
    """Run every (size, method, mode) in fresh workers; rank 0 prints the table and writes table and plot."""
    args = parse_args()
    show_progress()
    if args.plot_only:
        rows = json.loads(args.output.with_suffix(".json").read_text())
        command = args.output.read_text().split("`")[1] if args.output.exists() else "(earlier run)"
        print(write_outputs(rows, args, command, None))
        return
    init_distributed()
    run_or_exit(lambda: run_all(args))  # also writes the rows as JSON next to --output
    if dist.get_rank() == 0:
        rows = json.loads(args.output.with_suffix(".json").read_text())
        wall_s = wall_seconds()
        print(write_outputs(rows, args, command_line(dist.get_world_size(), "bench/scaling.py"), wall_s), flush=True)
        log(f"scaling: table and plot written to {args.output} and {args.output.with_suffix('.png')}")
    exit_cleanly(0)


if __name__ == "__main__":
    main()
