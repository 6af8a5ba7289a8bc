"""The report of a (possibly partial) sweep: statistics over seeds, tests against a baseline, plots.

From every finished cell (``cells/<hash>/run/eval_results.json`` and ``metrics.jsonl``):

- per group (task, method, lr, batch): mean ± std over seeds, the 95% confidence interval of the
  mean (Student's t), the number of seeds; against the baseline method (same task, lr, batch):
  Welch's t-test p-value and the mean paired difference (cells paired by seed);
- across tasks: the average relative improvement over the baseline, (m − b) / b per task, next to
  the plain mean of the metric;
- plots: the metric vs forward passes, vs wall-clock seconds, vs steps (mean over seeds, ± std band),
  peak memory per method, and the metric vs global batch when the grid has several;
- Markdown (``report.md``) and CSV (``cells.csv``, ``groups.csv``) tables.

pandas, scipy and matplotlib do the work (``pip install "subzero_ds[sweep]"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...config import ConfigError
from .spec import Cell

GROUP = ["task", "method", "lr", "batch_size"]


def _imports():
    try:
        import matplotlib  # noqa: F401
        import pandas
        import scipy.stats
    except ImportError as error:
        raise ConfigError(f"the sweep report needs pandas, scipy and matplotlib ({error.name} is missing): "
                          'pip install "subzero_ds[sweep]"') from None
    return pandas, scipy.stats


def collect(root: Path) -> tuple[Any, Any]:
    """(cells, curves) DataFrames of every finished cell: one row per cell; one row per evaluation."""
    pandas, _ = _imports()
    rows, curves = [], []
    for cell_file in sorted((root / "cells").glob("*/cell.json")):
        cell = Cell.model_validate_json(cell_file.read_text())
        run = cell_file.parent / "run"
        if not (run / "eval_results.json").is_file():
            continue
        results = json.loads((run / "eval_results.json").read_text())
        metric = next(iter(results["final"]))  # the task's metric (accuracy, f1 …)
        base = {"cell": cell.hash, "task": cell.task, "method": cell.method, "seed": cell.seed,
                "lr": cell.lr if cell.lr is not None else float("nan"), "batch_size": cell.batch_size}
        steps = results["steps"]  # the last step; train_seconds covers all of them, across resumes
        train_seconds, estimated = results["train_seconds"], bool(results.get("train_seconds_estimated", False))
        if "resumed_at_step" not in results and results.get("trained_steps", steps) < steps:
            # Written before runs recorded their time across resumes: only the last run's seconds are known.
            train_seconds, estimated = train_seconds * steps / results["trained_steps"], True
        rows.append({**base, "metric": metric, "value": results["final"][metric],
                     "zero_shot": results["zero_shot"][metric], "steps": steps,
                     "forwards": steps * cell.forwards_per_step, "train_seconds": train_seconds,
                     "train_seconds_estimated": estimated,
                     "peak_rss_mib": results.get("peak_rss_mib", float("nan")),
                     "peak_gpu_mib": results.get("peak_gpu_mib", float("nan"))})
        seconds_per_step = train_seconds / max(1, steps)
        for line in (run / "metrics.jsonl").read_text().splitlines():
            entry = json.loads(line)
            if f"eval_{metric}" in entry:
                curves.append({**base, "step": entry["step"], "forwards": entry["step"] * cell.forwards_per_step,
                               "seconds": entry["step"] * seconds_per_step, "value": entry[f"eval_{metric}"]})
    return pandas.DataFrame(rows), pandas.DataFrame(curves)


def group_statistics(cells: Any, baseline: str | None) -> Any:
    """Mean, std, 95% CI, n per group; and against ``baseline``: Welch's p-value and the paired difference."""
    pandas, stats = _imports()
    out = []
    for key, group in cells.groupby(GROUP, dropna=False):
        values = group["value"].to_numpy()
        n = len(values)
        std = float(values.std(ddof=1)) if n > 1 else float("nan")
        half = float(stats.t.ppf(0.975, n - 1) * std / n**0.5) if n > 1 else float("nan")
        row = dict(zip(GROUP, key), n=n, mean=float(values.mean()), std=std, ci95_low=float(values.mean()) - half,
                   ci95_high=float(values.mean()) + half, p_value=float("nan"), paired_difference=float("nan"))
        if baseline is not None and row["method"] != baseline:
            same = (cells["method"] == baseline) & (cells["task"] == row["task"]) & (cells["batch_size"] == row["batch_size"])
            same &= cells["lr"].isna() if pandas.isna(row["lr"]) else cells["lr"] == row["lr"]  # the same lr of the grid
            reference = cells[same]
            if len(reference) > 1 and n > 1:
                row["p_value"] = float(stats.ttest_ind(values, reference["value"].to_numpy(), equal_var=False).pvalue)
            paired = group.merge(reference[["seed", "value"]], on="seed", suffixes=("", "_baseline"))
            if len(paired):
                row["paired_difference"] = float((paired["value"] - paired["value_baseline"]).mean())
        out.append(row)
    return pandas.DataFrame(out)


def relative_improvement(cells: Any, baseline: str) -> Any:
    """Per method: the mean over tasks of (mean − baseline mean) / baseline mean, and the plain mean."""
    pandas, _ = _imports()
    means = cells.groupby(["task", "method"])["value"].mean().unstack("method")
    if baseline not in means:
        return pandas.DataFrame()
    relative = means.sub(means[baseline], axis=0).div(means[baseline], axis=0)
    return pandas.DataFrame({"relative_improvement": relative.mean(), "mean": means.mean(), "tasks": means.count()})


def plots(cells: Any, curves: Any, out: Path) -> list[Path]:
    """The report's PNGs (only those the data supports)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    written = []
    for axis, label in (("forwards", "forward passes"), ("seconds", "wall-clock seconds"), ("step", "steps")):
        if curves.empty:
            break
        figure = Figure(figsize=(6, 4))
        ax = figure.add_subplot()
        for (task, method), group in curves.groupby(["task", "method"]):
            series = group.groupby(axis)["value"].agg(["mean", "std"]).fillna(0.0)
            ax.plot(series.index, series["mean"], marker="o", label=f"{method} ({task})")
            ax.fill_between(series.index, series["mean"] - series["std"], series["mean"] + series["std"], alpha=0.2)
        ax.set_xlabel(label)
        ax.set_ylabel("metric (mean ± std over seeds)")
        ax.legend(fontsize=7)
        path = out / f"metric_vs_{axis}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        written.append(path)
    if not cells.empty:
        figure = Figure(figsize=(6, 3.5))
        ax = figure.add_subplot()
        memory = cells.groupby("method")["peak_rss_mib"].max()
        ax.bar(memory.index, memory.to_numpy())
        ax.set_ylabel("peak RSS per rank, MiB")
        ax.tick_params(axis="x", labelrotation=30)
        path = out / "peak_memory.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        written.append(path)
    if cells["batch_size"].nunique() > 1 if not cells.empty else False:
        figure = Figure(figsize=(6, 4))
        ax = figure.add_subplot()
        for method, group in cells.groupby("method"):
            series = group.groupby("batch_size")["value"].agg(["mean", "std"]).fillna(0.0)
            ax.errorbar(series.index, series["mean"], yerr=series["std"], marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch")
        ax.set_ylabel("metric")
        ax.legend(fontsize=7)
        path = out / "batch_size_study.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        written.append(path)
    return written


def write_report(root: Path, baseline: str | None = None, expected_cells: int | None = None) -> Path:
    """Write ``root/report/`` from the finished cells; returns the Markdown file."""
    cells, curves = collect(root)
    out = root / "report"
    out.mkdir(exist_ok=True)
    sweep = json.loads((root / "sweep.json").read_text()) if (root / "sweep.json").is_file() else {}
    baseline = baseline or sweep.get("baseline")
    lines = [f"# Sweep {sweep.get('name', root.name)}", ""]
    total = f" of {expected_cells}" if expected_cells else ""
    lines += [f"{len(cells)}{total} cells finished."]
    if cells.empty:
        (out / "report.md").write_text("\n".join(lines) + "\n")
        return out / "report.md"
    cells.to_csv(out / "cells.csv", index=False)
    groups = group_statistics(cells, baseline)
    groups.to_csv(out / "groups.csv", index=False)
    metric = ", ".join(sorted(cells["metric"].unique()))
    budget = sweep.get("budget", {})
    lines += ["", f"Metric: {metric} on the evaluation set. Budget per cell: "
              + ", ".join(f"{k} {v}" for k, v in budget.items() if v is not None)
              + ". Forward passes per step: ZO two-point 2 per query, HiZOO 3, first-order "
              f"{sweep.get('first_order_forwards_per_step', 3)} (a forward and a backward, counted as 1 + 2).",
              "", f"Zero-shot: {cells.groupby('task')['zero_shot'].first().to_dict()}", "",
              f"| task | method | lr | batch | n | mean ± std | 95% CI | p vs {baseline} (Welch) | paired Δ |",
              "|---|---|---|---|---|---|---|---|---|"]
    for _, g in groups.iterrows():
        lr = "—" if g["lr"] != g["lr"] else f"{g['lr']:g}"
        p = "—" if g["p_value"] != g["p_value"] else f"{g['p_value']:.3g}"
        d = "—" if g["paired_difference"] != g["paired_difference"] else f"{g['paired_difference']:+.4f}"
        std = "—" if g["std"] != g["std"] else f"{g['std']:.4f}"
        ci = "—" if g["ci95_low"] != g["ci95_low"] else f"[{g['ci95_low']:.4f}, {g['ci95_high']:.4f}]"
        lines.append(f"| {g['task']} | {g['method']} | {lr} | {g['batch_size']} | {g['n']} | {g['mean']:.4f} ± {std} "
                     f"| {ci} | {p} | {d} |")
    if baseline is not None:
        table = relative_improvement(cells, baseline)
        if not table.empty:
            lines += ["", f"Across tasks (relative to {baseline}):", "",
                      "| method | average relative improvement | mean metric | tasks |", "|---|---|---|---|"]
            for method, row in table.iterrows():
                lines.append(f"| {method} | {row['relative_improvement']:+.2%} | {row['mean']:.4f} | {int(row['tasks'])} |")
    estimated = cells.loc[cells["train_seconds_estimated"], "cell"].tolist()
    if estimated:
        lines += ["", f"Training seconds estimated for {', '.join(estimated)}: resumed from a checkpoint that did not "
                  "record the time before it, so the total is the resumed run's rate × steps."]
    figures = plots(cells, curves, out)
    lines += ["", "Plots: " + ", ".join(f"[{p.name}]({p.name})" for p in figures) + "."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
