"""What a run reports: metrics.jsonl rows (and DeepSpeed's monitors), peak memory and the closing summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from subzero_ds.distributed import is_main_process, log
from subzero_ds.engine import StepResult

from .first_order import FirstOrderResult


class MetricsLog:
    """metrics.jsonl (rank 0) plus DeepSpeed's own monitors (TensorBoard/CSV/W&B) when configured."""

    def __init__(self, path: Path, monitor: Any, after_step: int | None = None) -> None:
        """``after_step``: a resumed run keeps the rows up to that step and appends (later rows were
        written by the interrupted run after its last checkpoint, and are recomputed identically)."""
        self.file = None
        if is_main_process():
            kept = []
            if after_step is not None and path.exists():
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= after_step]
            self.file = open(path, "w")
            self.file.write("".join(line + "\n" for line in kept))
        self.monitor = monitor if getattr(monitor, "enabled", False) else None

    def write(self, row: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.monitor is not None:
            step = row["step"]
            self.monitor.write_events([(f"subzero/{k}", float(v), step) for k, v in row.items() if k != "step"])



def peak_memory(device: torch.device) -> dict[str, float]:
    """This rank's peak resident memory (and peak GPU memory on CUDA), in MiB, for comparisons across methods."""
    import resource

    peaks = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peaks["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peaks


def metrics_of(result: StepResult | FirstOrderResult) -> dict[str, Any]:
    """The metrics.jsonl fields of a step's result (ZO: both probes and g; first-order: the loss)."""
    if isinstance(result, FirstOrderResult):
        return {"loss": result.loss, "lr": result.lr}
    row = {"loss": result.loss, "loss_pos": result.loss_pos, "loss_neg": result.loss_neg,
           "projected_grad": result.projected_grad, "lr": result.lr, "skipped": result.skipped}
    if result.loss_clean is not None:
        row["loss_clean"] = result.loss_clean
    if len(result.projected_grads) > 1:
        row["projected_grads"] = list(result.projected_grads)
    return row



def print_summary(results: dict[str, Any], metric: str) -> None:
    rows = [("model", results["model"]), ("task", results["task"]), ("ranks", results["world_size"]),
            ("steps", f"{results['steps']} ({results['optimizer']})"), ("eval examples", results["num_eval"]),
            (f"zero-shot {metric}", f"{results['zero_shot'][metric]:.4f}"),
            (f"final {metric}", f"{results['final'][metric]:.4f}"),
            ("train time", f"{results['train_seconds']:.0f} s ({results['train_seconds'] / results['steps']:.2f} s/step)")]
    width = max(len(k) for k, _ in rows)
    log("\n".join(["", "=" * (width + 30)] + [f"{k:<{width}}  {v}" for k, v in rows] + ["=" * (width + 30)]))
