"""Validate the memory planner (``subzero_ds.memory``) against measured peak memory, 2-rank ZeRO-3 on CPU.

Run from the repository root:

    deepspeed --num_gpus 2 bench/memory_check.py            # ~4 min; writes bench/results/memory_check.md

Options: ``--models opt-10m opt-40m opt-125m`` (``opt-tiny``: the fixed cost), ``--dtype fp32 bf16``,
``--fused off on``, ``--malloc mmap default``, ``--batch-size 8``, ``--seq-len 128``, ``--steps 2``,
``--prefetch 50000000``, ``--output``. The raw measurements are saved next to ``--output`` as ``.json``;
``python bench/memory_check.py --rerender [--output …]`` re-predicts them after a planner change.

For every (model, dtype, fused) a fresh worker process per rank imports everything, records its RSS
(the baseline), builds an OPT-shaped model with random weights partitioned by ZeRO-3 at construction,
wraps it with ``subzero_ds.initialize`` and takes ``--steps`` ZO steps on a random batch. Measured:
peak RSS (``ru_maxrss``) minus the baseline, per rank. Predicted: the planner's per-rank total with
``device="cpu"`` (on a CPU-only machine the "GPU" bytes live in host RAM too), from the config.json
the worker writes and the same DeepSpeed config dict the run uses.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from harness.models import DTYPES, build_partitioned, opt_shape, random_batch
from harness.report import command_line, per_rank, publish, table
from harness.workers import exit_cleanly, peak_rss_mib, rss_mib, run_fresh_workers, run_or_exit, show_progress, wall_seconds
from transformers import OPTForCausalLM

import subzero_ds
from subzero_ds import memory
from subzero_ds.distributed import get_world_size_and_rank, init_distributed, log

RSS_BASELINE_MIB = rss_mib()  # after every import above
TOLERANCE = 0.15

# OPT-shaped models (vocabulary 50272, 2048 positions, ffn 4 × hidden). opt-tiny (vocabulary 64, 2K
# parameters) measures the fixed cost of a ZeRO-3 process (not a default).
MODELS = {"opt-10m": opt_shape(192, 4, 4), "opt-40m": opt_shape(512, 6, 8), "opt-125m": opt_shape(768, 12, 12),
          "opt-tiny": opt_shape(16, 1, 2, ffn=32, vocab=64)}


def ds_config(dtype: str, fused: bool, batch_size: int, prefetch: int) -> dict[str, Any]:
    """ZeRO-3, no optimizer, SubZero (rank 24), in-place or fused."""
    return {"train_micro_batch_size_per_gpu": batch_size, "bf16": {"enabled": dtype == "bf16"}, "steps_per_print": 1 << 30,
            "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": prefetch},
            "subzero": {"method": "subzero", "lr": 1e-7, "eps": 1e-3, "rank": 24, "seed": 0, "fused": fused}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["opt-10m", "opt-40m", "opt-125m"])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--fused", nargs="+", choices=["off", "on"], default=["off"])
    parser.add_argument("--batch-size", type=int, default=8, help="rows per rank")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    parser.add_argument("--steps", type=int, default=2, help="ZO steps per configuration")
    parser.add_argument("--prefetch", type=int, default=50_000_000, help="stage3_prefetch_bucket_size")
    parser.add_argument("--malloc", nargs="+", choices=["mmap", "default"], default=["mmap", "default"],
                        help="mmap: MALLOC_MMAP_THRESHOLD_=65536 in the workers (RSS tracks live tensors); default: as is")
    parser.add_argument("--output", type=Path, default=Path("bench/results/memory_check.md"))
    parser.add_argument("--rerender", action="store_true", help="no run: re-predict the .json saved next to --output")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "DTYPE", "FUSED"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_worker(args: argparse.Namespace) -> None:
    """One configuration on this rank: build, step, and write the measured peaks as JSON."""
    name, dtype, fused = args.worker
    torch.set_num_threads(1)
    init_distributed()
    phases = {"process group": peak_rss_mib()}
    config = ds_config(dtype, fused == "on", args.batch_size, args.prefetch)
    model = build_partitioned(OPTForCausalLM, MODELS[name](), config, DTYPES[dtype])
    phases["model built"] = peak_rss_mib()
    engine = subzero_ds.initialize(model=model, config=config)
    phases["initialize"] = peak_rss_mib()
    batch = random_batch(args.batch_size, args.seq_len, engine.module.config.vocab_size, seed=get_world_size_and_rank()[1])
    for step in range(args.steps):
        engine.step(batch)
        phases[f"step {step}"] = peak_rss_mib()
    args.result.write_text(json.dumps({"baseline_mib": RSS_BASELINE_MIB, "peaks_mib": phases, "end_rss_mib": rss_mib(),
                                       "params": sum(int(p.ds_numel) for p in engine.module.parameters())}))
    exit_cleanly(0)


def run_configuration(args: argparse.Namespace, name: str, dtype: str, fused: str, malloc: str) -> list[dict[str, Any]] | None:
    """Every rank's worker result for one configuration (on rank 0; None elsewhere)."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | {"OMP_NUM_THREADS": "1"}
    if malloc == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # every freed block > 64 KiB goes back to the OS
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, dtype, fused,
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--prefetch", str(args.prefetch)]  # fmt: skip
    return run_fresh_workers(command, env, 1800, f"{name}/{dtype}/fused={fused}")


def add_prediction(row: dict[str, Any], args: argparse.Namespace, world: int) -> dict[str, Any]:
    """``row`` (measurements of one configuration) with the planner's current prediction, from a config.json
    written like a user's."""
    with tempfile.TemporaryDirectory() as tmp:
        MODELS[row["model"]]().save_pretrained(tmp)
        estimate = memory.estimate(tmp, ds_config(row["dtype"], row["fused"] == "on", args.batch_size, args.prefetch),
                                   memory.Cluster(nodes=1, gpus_per_node=world, gpu_memory_gib=24, cpu_memory_gib=24),
                                   memory.BatchShape(args.batch_size, args.seq_len), device="cpu")
    predicted, mean = estimate.host_total / 2**20, sum(row["measured"]) / len(row["measured"])
    return {**row, "predicted": predicted, "error": (predicted - mean) / mean, "moment": estimate.peak_moment,
            "report": estimate.report()}  # fmt: skip


def report(rows: list[dict[str, Any]], args: argparse.Namespace, world: int, wall_s: float) -> str:
    """The table of measured vs predicted peaks, the verdict per allocator setting, and the planner's items."""
    worst = {m: max(abs(r["error"]) for r in rows if r["malloc"] == m) for m in dict.fromkeys(r["malloc"] for r in rows)}
    verdicts = [f"malloc={m}: worst {w:.1%} ({'within' if w <= TOLERANCE else 'outside'} ±{TOLERANCE:.0%})"
                for m, w in worst.items()]
    lines = [
        "# Memory planner vs measured peak (2-rank ZeRO-3 on CPU)",
        "",
        f"Command: `{command_line(world, 'bench/memory_check.py')}`",
        f"SubZero (rank 24), in-place unless 'fused', batch {args.batch_size} × {args.seq_len} tokens per rank, "
        f"{args.steps} steps, stage3_prefetch_bucket_size {args.prefetch:g}, SDPA, 1 torch thread per rank. "
        f"Wall time {wall_s / 60:.1f} min.",
        "",
        *table(["model", "params", "dtype", "fused", "malloc", "measured MiB per rank (peak RSS − baseline)",
                "predicted MiB", "error", "peak once built MiB", "predicted peak moment"],
               [[r["model"], f"{r['params'] / 1e6:.1f}M", r["dtype"], r["fused"], r["malloc"], per_rank(r["measured"]),
                 f"{r['predicted']:,.0f}", f"{r['error']:+.1%}", per_rank(r["built"]), r["moment"]] for r in rows]),
        "",
        "Error = (predicted − mean measured) / mean measured. " + "; ".join(verdicts) + ".",
        "malloc=mmap runs the workers with `MALLOC_MMAP_THRESHOLD_=65536`: every freed block above 64 KiB goes back to the "
        "OS, so RSS follows the live tensors the planner models (as `torch.cuda.max_memory_allocated` would on a GPU). "
        "malloc=default is glibc as shipped: its mmap threshold rises to the largest freed block (up to 32 MiB), so freed "
        "parameter copies and activations below that size stay in heap holes that RSS keeps counting; the difference "
        "between the two rows is allocator retention, not tensors.",
        "Baseline: RSS of the worker right after importing torch, transformers, DeepSpeed and subzero_ds. 'Peak once "
        "built' is the peak above baseline when `subzero_ds.initialize` has returned.",
        "",
        f"Planner items of the last configuration (`device=\"cpu\"`: GPU bytes counted in host RAM):\n\n```\n"
        f"{rows[-1]['report']}\n```",
    ]
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict[str, Any]], args: argparse.Namespace, world: int, wall_s: float) -> None:
    """Markdown to ``--output`` and the raw measurements next to it (``.json``), for ``--rerender``."""
    raw = {"argv": sys.argv[1:], "world": world, "wall_s": wall_s, "rows": rows}
    publish(report([add_prediction(r, args, world) for r in rows], args, world, wall_s), args.output, "memory_check", raw)


def rerender(args: argparse.Namespace) -> None:
    """Recompute the predictions for the measurements saved in ``--output``'s ``.json`` (no run)."""
    raw = json.loads(args.output.with_suffix(".json").read_text())
    saved = parse_args([a for a in raw["argv"] if not a.startswith("--local_rank")] + ["--output", str(args.output)])
    sys.argv = [sys.argv[0], *raw["argv"]]  # the report names the command that measured
    write_report(raw["rows"], saved, raw["world"], raw["wall_s"])


def run_launched(args: argparse.Namespace) -> None:
    """Every configuration in fresh workers; rank 0 writes the report."""
    init_distributed()
    world, rows = dist.get_world_size(), []
    for name, dtype, fused, malloc in itertools.product(args.models, args.dtype, args.fused, args.malloc):
        log(f"memory_check: {name} {dtype} fused={fused} malloc={malloc}")
        gathered = run_configuration(args, name, dtype, fused, malloc)
        if gathered is None:
            continue
        rows.append({"model": name, "malloc": malloc, "params": gathered[0]["params"], "dtype": dtype, "fused": fused,
                     "measured": [g["peaks_mib"][f"step {args.steps - 1}"] - g["baseline_mib"] for g in gathered],
                     "built": [g["peaks_mib"]["initialize"] - g["baseline_mib"] for g in gathered],
                     "phases": [g["peaks_mib"] for g in gathered]})
        predicted = add_prediction(rows[-1], args, world)["predicted"]
        log(f"memory_check: measured {rows[-1]['measured']} MiB, predicted {predicted:.0f} MiB")
    if dist.get_rank() == 0:
        write_report(rows, args, world, wall_seconds())


def main() -> None:
    """The launched process (``--rerender``: no run), or a worker (``--worker``)."""
    args = parse_args()
    show_progress()
    if args.worker:
        run_worker(args)
    if args.rerender:
        return rerender(args)
    run_or_exit(lambda: run_launched(args))
    exit_cleanly(0)


if __name__ == "__main__":
    main()
