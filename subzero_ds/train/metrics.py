"""What a run reports: metrics.jsonl rows (and DeepSpeed's monitors), throughput, peak memory, the summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from subzero_ds.distributed import is_main_process, log, sum_over_ranks


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
        """Append ``row`` (it has a ``step``); the monitors get each other field as ``subzero/<name>``."""
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.monitor is not None:
            step = row["step"]
            self.monitor.write_events([(f"subzero/{k}", float(v), step) for k, v in row.items() if k != "step"])


class Throughput:
    """Seconds per step and tokens per second over the steps since the last logged row.

    Args:
        forwards_per_micro_batch: forward passes a micro-batch costs (its tokens are counted that often).
        world_size: ranks (they see equal shares, so this rank's tokens × world size is the step's).
    """

    def __init__(self, forwards_per_micro_batch: int, world_size: int) -> None:
        self.scale = forwards_per_micro_batch * world_size
        self.start, self.tokens = time.perf_counter(), 0

    def count(self, batch: dict[str, Any]) -> None:
        """Count the tokens of one of this rank's micro-batches."""
        self.tokens += self.scale * int(batch["attention_mask"].sum())

    def row(self, steps: int) -> dict[str, float]:
        """``seconds_per_step`` and ``tokens_per_second`` of the last ``steps`` steps; starts a new window."""
        now = time.perf_counter()
        row = {"seconds_per_step": (now - self.start) / steps, "tokens_per_second": self.tokens / (now - self.start)}
        self.start, self.tokens = now, 0
        return row


def peak_memory(device: torch.device) -> dict[str, float]:
    """This rank's peak resident memory (and peak GPU memory on CUDA), in MiB, for comparisons across methods."""
    import resource

    peaks = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peaks["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peaks


def print_summary(results: dict[str, Any], metric: str) -> None:
    """The closing table: model, task, ranks, steps, the zero-shot and final ``metric``, the training time."""
    rows = [("model", results["model"]), ("task", results["task"]), ("ranks", results["world_size"]),
            ("steps", f"{results['steps']} ({results['optimizer']})"), ("eval examples", results["num_eval"]),
            (f"zero-shot {metric}", f"{results['zero_shot'][metric]:.4f}"),
            (f"final {metric}", f"{results['final'][metric]:.4f}"),
            ("train time", f"{results['train_seconds']:.0f} s ({results['train_seconds'] / results['steps']:.2f} s/step)")]
    width = max(len(k) for k, _ in rows)
    log("\n".join(["", "=" * (width + 30)] + [f"{k:<{width}}  {v}" for k, v in rows] + ["=" * (width + 30)]))


class TrainingTime:
    """Seconds spent training, from now: this process's (for --max_train_seconds) and the whole run's.

    Args:
        before: seconds the run trained before this process (a resumed run: its checkpoint's); None
            when unknown (a checkpoint from before the field existed): the total is then estimated.
    """

    def __init__(self, before: float | None) -> None:
        self.before, self.started = before, time.perf_counter()

    def out_of(self, budget: float) -> bool:
        """Whether any rank has trained ``budget`` seconds (0: no budget); every rank gets the same answer."""
        return budget > 0 and sum_over_ranks(float(time.perf_counter() - self.started >= budget))[0] > 0

    def total(self) -> float | None:
        """The whole run's training seconds so far (None when the seconds before are unknown)."""
        return None if self.before is None else self.before + time.perf_counter() - self.started

    def whole_run(self, last_step: int, trained_steps: int) -> tuple[float, bool]:
        """(training seconds up to ``last_step``, whether estimated from this process's ``trained_steps``)."""
        seconds = time.perf_counter() - self.started
        if self.before is None:
            return seconds * last_step / trained_steps, True
        return self.before + seconds, False
