"""``subzero-plot``: draw a run's training loss and evaluation metrics from its metrics.jsonl.

    subzero-plot out/metrics.jsonl -o loss.png

Each line of the file is one JSON object. Training rows carry ``"step"`` and ``"loss"`` (other keys,
e.g. ``"loss_pos"``, ``"lr"``, are ignored); evaluation rows carry ``"step"`` and ``"eval_<metric>"``
keys; one row may be both. Rows with neither (a header, say) are skipped. The top panel shows the
training loss, raw and faint, with a trailing moving average, and ``eval_loss`` if present; a second
panel shows every other ``eval_*`` metric (accuracy, F1, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

EVAL_PREFIX = "eval_"


class MetricsFileError(ValueError):
    """The metrics file is missing, empty, malformed, or holds nothing to plot."""


@dataclass
class Series:
    """Points (step, value) of one quantity, in file order."""

    steps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: float, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)


@dataclass
class Metrics:
    """What a metrics.jsonl holds that can be plotted."""

    train_loss: Series = field(default_factory=Series)
    evals: dict[str, Series] = field(default_factory=dict)  # "eval_accuracy" -> series


def read_metrics(path: str | Path) -> Metrics:
    """Parse a metrics.jsonl file.

    Args:
        path: the file; one JSON object per line, blank lines allowed.

    Returns:
        The training-loss series and one series per numeric ``eval_*`` key.

    Raises:
        MetricsFileError: if the file is missing or empty, a line is not a JSON object, a plotted
            row has no numeric ``step`` or a non-numeric ``loss``, or no row has anything to plot.
    """
    path = Path(path)
    if not path.is_file():
        raise MetricsFileError(f"metrics file {path} does not exist (or is not a file); pass the metrics.jsonl a training run wrote.")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not any(line.strip() for line in lines):
        raise MetricsFileError(f"metrics file {path} is empty: the run has not logged a step yet.")

    metrics = Metrics()
    for number, line in enumerate(lines, start=1):
        if line.strip():
            _add_row(metrics, _parse_row(line, path, number), path, number)
    if not metrics.train_loss.steps and not metrics.evals:
        raise MetricsFileError(
            f"metrics file {path} has no row with a `loss` or `{EVAL_PREFIX}*` key: nothing to plot."
        )
    return metrics


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start), skipping non-finite ones.

    Args:
        values: the raw series.
        window: how many points to average, >= 1.

    Returns:
        A list as long as ``values``; NaN where the window holds no finite value.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(0, end - window)
    window_counts = counts[end] - counts[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (sums[end] - sums[start]) / window_counts
    return np.where(window_counts > 0, means, math.nan).tolist()


def default_window(n_points: int) -> int:
    """A moving-average window of about 5% of the points, between 1 and 100."""
    return max(1, min(100, n_points // 20))


def plot_metrics(metrics: Metrics, output: str | Path, window: int | None = None, title: str | None = None) -> Path:
    """Draw the training loss (raw + moving average) and the eval metrics vs step into a PNG.

    Args:
        metrics: what :func:`read_metrics` returned.
        output: the PNG to write; its folder is created if needed.
        window: moving-average window in training rows; default :func:`default_window`.
        title: the figure title.

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is not installed (it comes with the extra ``subzero_ds[plot]``).
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    except ImportError as error:
        raise ImportError(f"plotting needs matplotlib, which did not import ({error}): "
                          'pip install "subzero_ds[plot]"') from None

    output = Path(output)
    loss_evals = {k: s for k, s in metrics.evals.items() if k == f"{EVAL_PREFIX}loss"}
    score_evals = {k: s for k, s in metrics.evals.items() if k not in loss_evals}
    has_loss_panel = bool(metrics.train_loss.steps or loss_evals)
    n_panels = int(has_loss_panel) + int(bool(score_evals))

    figure = Figure(figsize=(8, 3.2 * n_panels + 0.6), dpi=100, layout="constrained")
    axes = list(figure.subplots(n_panels, 1, sharex=True, squeeze=False)[:, 0])
    if has_loss_panel:
        _draw_losses(axes[0], metrics.train_loss, loss_evals, window)
    if score_evals:
        _draw_scores(axes[-1], score_evals)
    axes[-1].set_xlabel("step")
    if title:
        figure.suptitle(title)

    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``subzero-plot``; returns the exit status (2 for a bad input file or no matplotlib)."""
    parser = argparse.ArgumentParser(
        prog="subzero-plot", description="Plot training loss and evaluation metrics from a metrics.jsonl."
    )
    parser.add_argument("metrics", type=Path, help="metrics.jsonl written by a training run")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: next to the metrics file, .png)")
    parser.add_argument("--window", type=int, help="moving-average window in training steps (default: ~5%% of them)")
    parser.add_argument("--title", help="figure title (default: the metrics file's path)")
    args = parser.parse_args(argv)
    if args.window is not None and args.window < 1:
        parser.error(f"--window must be >= 1, got {args.window}")

    output = args.output or args.metrics.with_suffix(".png")
    try:
        metrics = read_metrics(args.metrics)
        plot_metrics(metrics, output, window=args.window, title=args.title or str(args.metrics))
    except (MetricsFileError, OSError, ImportError) as e:
        print(f"subzero-plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    return 0


def _parse_row(line: str, path: Path, number: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise MetricsFileError(f"{path}, line {number}: not valid JSON ({e.msg}): {_preview(line)}") from None
    if not isinstance(row, dict):
        raise MetricsFileError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}: {_preview(line)}")
    return row


def _add_row(metrics: Metrics, row: dict[str, Any], path: Path, number: int) -> None:
    evals = {k: v for k, v in row.items() if k.startswith(EVAL_PREFIX) and _is_number(v)}
    if "loss" not in row and not evals:
        return
    step = row.get("step")
    if not _is_number(step):
        raise MetricsFileError(f"{path}, line {number}: `step` must be a number, got {step!r}.")
    if "loss" in row:
        if not _is_number(row["loss"]):
            raise MetricsFileError(f"{path}, line {number}: `loss` must be a number, got {row['loss']!r}.")
        metrics.train_loss.add(step, float(row["loss"]))
    for key, value in evals.items():
        metrics.evals.setdefault(key, Series()).add(step, float(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _preview(line: str, limit: int = 80) -> str:
    line = line.strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _draw_losses(ax, train: Series, loss_evals: dict[str, Series], window: int | None) -> None:
    if train.steps:
        window = window or default_window(len(train.values))
        ax.plot(train.steps, train.values, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss")
        smooth = moving_average(train.values, window)
        ax.plot(train.steps, smooth, color="tab:blue", linewidth=1.8, label=f"train loss, mean of {window}")
    for key, series in loss_evals.items():
        ax.plot(series.steps, series.values, "o-", color="tab:red", markersize=4, label=key.replace("_", " "))
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def _draw_scores(ax, evals: dict[str, Series]) -> None:
    for key, series in sorted(evals.items()):
        ax.plot(series.steps, series.values, "o-", markersize=4, label=key[len(EVAL_PREFIX):].replace("_", " "))
    ax.set_ylabel("eval metric")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")


if __name__ == "__main__":
    sys.exit(main())
