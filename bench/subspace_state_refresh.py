"""What SubZero's subspace-coordinate momentum/Adam state should do at a subspace refresh: reset or project.

Run from the repository root (one process, ~2 min on 2 cores):

    .venv/bin/python bench/subspace_state_refresh.py

The tiny LLaMA of tests/helpers/tiny.py fitting one fixed batch of 8 sequences of its next-token
pattern task (an optimization problem: how fast the loss falls), SubZero r = 4 with a refresh every 10 steps (so that refreshes happen often), for
``--steps`` steps, for each update rule (momentum, Adam) × {reset, project} × ``--seeds`` run
seeds. Reports the mean training loss of the last 20 steps (mean ± std over seeds) and of windows
of the run. Writes ``--output`` (default ``bench/results/subspace_state_refresh.md``).
"""

from __future__ import annotations

import argparse
import sys
import statistics
import time
from pathlib import Path

import torch

from harness.report import publish

import subzero_ds
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny models
from helpers.tiny import pattern_batch, tiny_model  # noqa: E402

SETTINGS = {"momentum": {"update": "momentum", "momentum": 0.9, "lr": 5e-4},
            "adam": {"update": "adam", "lr": 2e-3}}


def run(rule: str, on_refresh: str, seed: int, steps: int) -> list[float]:
    config = {"zero_optimization": {"stage": 0},
              "subzero": {"method": "subzero", "eps": 1e-3, "rank": 4, "subspace_interval": 10, "seed": seed,
                          "state_on_refresh": on_refresh, **SETTINGS[rule]}}
    engine = subzero_ds.initialize(model=tiny_model("llama", seed=seed), config=config)
    batch = pattern_batch(8, seed=1000 + seed)  # one fixed batch: an optimization problem, not generalization
    return [engine.step(batch).loss for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("bench/results/subspace_state_refresh.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    lines = ["# SubZero subspace state at a refresh: reset vs project (`bench/subspace_state_refresh.py`)", "",
             f"Tiny LLaMA (2 layers, width 64) fitting one fixed batch of 8 pattern sequences, SubZero r = 4, refresh "
             f"every 10 steps, {args.steps} steps, run seeds 0–{args.seeds - 1}. Mean training loss.", "",
             "| update | at refresh | last 20 steps (mean ± std over seeds) | steps 1–50 | 51–100 | 101–150 | 151–200 |",
             "|---|---|---|---|---|---|---|"]
    for rule in SETTINGS:
        for on_refresh in ("reset", "project"):
            runs = [run(rule, on_refresh, seed, args.steps) for seed in range(args.seeds)]
            last = [statistics.mean(r[-20:]) for r in runs]
            windows = [statistics.mean(statistics.mean(r[a : a + 50]) for r in runs) for a in range(0, args.steps, 50)]
            lines.append(f"| {rule} | {on_refresh} | {statistics.mean(last):.4f} ± {statistics.stdev(last):.4f} | "
                         + " | ".join(f"{w:.4f}" for w in windows) + " |")
    lines += ["", f"Wall time {time.perf_counter() - started:.0f} s."]
    publish("\n".join(lines) + "\n", args.output, "subspace_state_refresh")


if __name__ == "__main__":
    main()
