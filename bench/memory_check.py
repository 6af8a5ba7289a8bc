"""Validate the memory planner (``subzero_ds.memory``) against measured peak memory, 2-rank ZeRO-3 on CPU.

Run from the repository root:

    deepspeed --num_gpus 2 bench/memory_check.py            # ~4 min; writes bench/results/memory_check.md

Options: ``--models opt-10m opt-40m opt-125m``, ``--dtype fp32 bf16``, ``--fused off on``,
``--malloc mmap default``, ``--batch-size 8``, ``--seq-len 128``, ``--steps 2``,
``--prefetch 50000000``, ``--output``. The raw measurements are saved next to ``--output`` as
``.json``; ``python bench/memory_check.py --rerender [--output …]`` recomputes the predictions
for them after a change to the planner, without running anything.

For every (model, dtype, fused) configuration a fresh worker process per rank imports everything,
records its RSS (the baseline), builds an OPT-shaped model with random weights partitioned by
ZeRO-3 at construction, wraps it with ``subzero_ds.initialize`` and takes ``--steps`` ZO steps on
a random batch. Measured: peak RSS (``ru_maxrss``) minus the baseline, per rank. Predicted: the
planner's per-rank total with ``device="cpu"`` (on a CPU-only machine the "GPU" bytes live in host
RAM too, so GPU + CPU columns are compared with one RSS). The planner reads the model from the
config.json the worker writes, and the same DeepSpeed config dict the run uses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from harness.models import random_batch
from harness.workers import broadcast, exit_cleanly, peak_rss_mib, run_or_exit, show_progress
from transformers import OPTConfig, OPTForCausalLM
from transformers.integrations import HfDeepSpeedConfig

import subzero_ds
from subzero_ds import memory
from subzero_ds.distributed import (
    free_port,
    get_world_size_and_rank,
    init_distributed,
    log,
)

RSS_BASELINE_MIB = psutil.Process().memory_info().rss / 2**20  # after every import above
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = 0.15

# OPT-shaped models: (hidden, layers, heads, ffn); vocabulary 50272 and 2048 positions as OPT.
# opt-tiny (vocabulary 64, 2K parameters) measures the fixed cost of a ZeRO-3 process (not a default).
MODELS = {
    "opt-10m": (192, 4, 4, 768),
    "opt-40m": (512, 6, 8, 2048),
    "opt-125m": (768, 12, 12, 3072),
    "opt-tiny": (16, 1, 2, 32),
}
DEFAULT_MODELS = ["opt-10m", "opt-40m", "opt-125m"]


def opt_config(name: str) -> OPTConfig:
    """The OPTConfig of one of :data:`MODELS` (no KV cache)."""
    hidden, layers, heads, ffn = MODELS[name]
    return OPTConfig(
        vocab_size=64 if name == "opt-tiny" else 50272, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn, num_attention_heads=heads,
        max_position_embeddings=2048, word_embed_proj_dim=hidden, use_cache=False,
    )  # fmt: skip


def ds_config(dtype: str, fused: bool, batch_size: int, prefetch: int) -> dict[str, Any]:
    """ZeRO-3, no optimizer, SubZero (rank 24), in-place or fused."""
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": prefetch},
        "bf16": {"enabled": dtype == "bf16"},
        "steps_per_print": 1 << 30,
        "subzero": {"method": "subzero", "lr": 1e-7, "eps": 1e-3, "rank": 24, "seed": 0, "fused": fused},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=DEFAULT_MODELS)
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--fused", nargs="+", choices=["off", "on"], default=["off"])
    parser.add_argument("--batch-size", type=int, default=8, help="rows per rank")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    parser.add_argument("--steps", type=int, default=2, help="ZO steps per configuration")
    parser.add_argument("--prefetch", type=int, default=50_000_000, help="stage3_prefetch_bucket_size")
    parser.add_argument("--malloc", nargs="+", choices=["mmap", "default"], default=["mmap", "default"],
                        help="mmap: MALLOC_MMAP_THRESHOLD_=65536 in the workers (RSS tracks live tensors); default: glibc as is")
    parser.add_argument("--output", type=Path, default=Path("bench/results/memory_check.md"))
    parser.add_argument("--rerender", action="store_true",
                        help="no run: recompute predictions for the measurements saved next to --output (.json)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "DTYPE", "FUSED"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def run_worker(args: argparse.Namespace) -> None:
    """One configuration on this rank: build, step, and write the measured peaks as JSON."""
    name, dtype, fused = args.worker
    torch.set_num_threads(1)
    init_distributed()
    phases = {"process group": peak_rss_mib()}
    config = ds_config(dtype, fused == "on", args.batch_size, args.prefetch)
    hf_ds_config = HfDeepSpeedConfig(config)  # noqa: F841 - alive while the model is created: ZeRO-3 init
    model = OPTForCausalLM._from_config(opt_config(name), dtype=DTYPES[dtype], attn_implementation="sdpa").eval()
    phases["model built"] = peak_rss_mib()
    engine = subzero_ds.initialize(model=model, config=config)
    phases["initialize"] = peak_rss_mib()
    _, rank = get_world_size_and_rank()
    batch = random_batch(args.batch_size, args.seq_len, engine.module.config.vocab_size, seed=rank)
    for step in range(args.steps):
        engine.step(batch)
        phases[f"step {step}"] = peak_rss_mib()
    result = {"baseline_mib": RSS_BASELINE_MIB, "peaks_mib": phases, "end_rss_mib": rss_mib(),
              "params": sum(int(p.ds_numel) for p in engine.module.parameters())}  # fmt: skip
    args.result.write_text(json.dumps(result))
    exit_cleanly(0)


def run_configuration(args: argparse.Namespace, name: str, dtype: str, fused: str, malloc: str) -> list[dict[str, Any]] | None:
    """Every rank's worker result for one configuration (on rank 0; None elsewhere)."""
    port = broadcast(free_port() if dist.get_rank() == 0 else None)
    env = {**os.environ, "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if malloc == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # every freed block > 64 KiB goes back to the OS
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result.json"
        command = [sys.executable, os.path.abspath(__file__), "--worker", name, dtype, fused, "--result", str(path),
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                   "--prefetch", str(args.prefetch)]  # fmt: skip
        completed = subprocess.run(command, env=env, timeout=1800, check=False)
        result = json.loads(path.read_text()) if completed.returncode == 0 else {"failure": completed.returncode}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    failures = [f"rank {r}: exit {g['failure']}" for r, g in enumerate(gathered) if "failure" in g]
    if failures:
        raise RuntimeError(f"the {name}/{dtype}/fused={fused} worker failed ({'; '.join(failures)})")
    return gathered if dist.get_rank() == 0 else None


def predict(args: argparse.Namespace, name: str, dtype: str, fused: str, world: int) -> memory.Estimate:
    """The planner's estimate for one configuration, from a config.json written like a user's."""
    with tempfile.TemporaryDirectory() as tmp:
        opt_config(name).save_pretrained(tmp)
        return memory.estimate(
            tmp, ds_config(dtype, fused == "on", args.batch_size, args.prefetch),
            memory.Cluster(nodes=1, gpus_per_node=world, gpu_memory_gib=24, cpu_memory_gib=24),
            memory.BatchShape(args.batch_size, args.seq_len), device="cpu",
        )  # fmt: skip


def report(rows: list[dict[str, Any]], args: argparse.Namespace, world: int, wall_s: float) -> str:
    lines = [
        "# Memory planner vs measured peak (2-rank ZeRO-3 on CPU)",
        "",
        f"Command: `{command_line(world)}`",
        f"SubZero (rank 24), in-place unless 'fused', batch {args.batch_size} × {args.seq_len} tokens per rank, "
        f"{args.steps} steps, stage3_prefetch_bucket_size {args.prefetch:g}, SDPA, 1 torch thread per rank. "
        f"Wall time {wall_s / 60:.1f} min.",
        "",
        "| model | params | dtype | fused | malloc | measured MiB per rank (peak RSS − baseline) | predicted MiB | error "
        "| peak once built MiB | predicted peak moment |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        measured = " / ".join(f"{m:,.0f}" for m in r["measured"])
        built = " / ".join(f"{m:,.0f}" for m in r["built"])
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['dtype']} | {r['fused']} | {r['malloc']} | {measured} | "
            f"{r['predicted']:,.0f} | {r['error']:+.1%} | {built} | {r['moment']} |"
        )
    verdicts = []
    for malloc in dict.fromkeys(r["malloc"] for r in rows):
        worst = max(abs(r["error"]) for r in rows if r["malloc"] == malloc)
        verdicts.append(f"malloc={malloc}: worst {worst:.1%} ({'within' if worst <= TOLERANCE else 'outside'} ±{TOLERANCE:.0%})")
    lines += [
        "",
        "Error = (predicted − mean measured) / mean measured. " + "; ".join(verdicts) + ".",
        "malloc=mmap runs the workers with `MALLOC_MMAP_THRESHOLD_=65536`: every freed block above 64 KiB goes "
        "back to the OS, so RSS follows the live tensors the planner models (as `torch.cuda.max_memory_allocated` "
        "would on a GPU). malloc=default is glibc as shipped: its mmap threshold rises to the largest freed block "
        "(up to 32 MiB), so freed parameter copies and activations below that size stay in heap holes that RSS "
        "keeps counting; the difference between the two rows is allocator retention, not tensors.",
        "Baseline: RSS of the worker right after importing torch, transformers, DeepSpeed and subzero_ds. "
        "'Peak once built' is the peak above baseline when `subzero_ds.initialize` has returned.",
        "",
        "Planner items of the last configuration (`device=\"cpu\"`: GPU bytes counted in host RAM):",
        "",
        "```",
        rows[-1]["report"],
        "```",
    ]
    return "\n".join(lines) + "\n"


def command_line(world: int) -> str:
    options = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    return " ".join(["deepspeed", "--num_gpus", str(world), "bench/memory_check.py", *options])


def add_prediction(row: dict[str, Any], args: argparse.Namespace, world: int) -> dict[str, Any]:
    """``row`` (measurements of one configuration) with the planner's current prediction added."""
    estimate = predict(args, row["model"], row["dtype"], row["fused"], world)
    predicted = estimate.host_total / 2**20
    mean = sum(row["measured"]) / len(row["measured"])
    return {**row, "predicted": predicted, "error": (predicted - mean) / mean, "moment": estimate.peak_moment,
            "report": estimate.report()}  # fmt: skip


def write_report(rows: list[dict[str, Any]], args: argparse.Namespace, world: int, wall_s: float) -> None:
    """Markdown to ``--output`` and the raw measurements next to it (``.json``), for ``--rerender``."""
    text = report([add_prediction(r, args, world) for r in rows], args, world, wall_s)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    raw = {"argv": sys.argv[1:], "world": world, "wall_s": wall_s, "rows": rows}
    args.output.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(text, flush=True)


def rerender(args: argparse.Namespace) -> None:
    """Recompute the predictions for the measurements saved in ``--output``'s ``.json`` (no run)."""
    raw = json.loads(args.output.with_suffix(".json").read_text())
    saved = parse_args([a for a in raw["argv"] if not a.startswith("--local_rank")])
    sys.argv = [sys.argv[0], *raw["argv"]]  # the report names the command that measured
    write_report(raw["rows"], saved, raw["world"], raw["wall_s"])


def run_launched(args: argparse.Namespace) -> None:
    init_distributed()
    world = dist.get_world_size()
    rows = []
    for name in args.models:
        for dtype in args.dtype:
            for fused, malloc in ((f, m) for f in args.fused for m in args.malloc):
                log(f"memory_check: {name} {dtype} fused={fused} malloc={malloc}")
                gathered = run_configuration(args, name, dtype, fused, malloc)
                if gathered is None:
                    continue
                rows.append({
                    "model": name, "malloc": malloc, "params": gathered[0]["params"], "dtype": dtype, "fused": fused,
                    "measured": [g["peaks_mib"][f"step {args.steps - 1}"] - g["baseline_mib"] for g in gathered],
                    "built": [g["peaks_mib"]["initialize"] - g["baseline_mib"] for g in gathered],
                    "phases": [g["peaks_mib"] for g in gathered],
                })  # fmt: skip
                predicted = add_prediction(rows[-1], args, world)["predicted"]
                log(f"memory_check: measured {rows[-1]['measured']} MiB, predicted {predicted:.0f} MiB")
    if dist.get_rank() == 0:
        write_report(rows, args, world, time.time() - psutil.Process().create_time())


def main() -> None:
    args = parse_args()
    show_progress()
    if args.worker:
        run_worker(args)
    if args.rerender:
        rerender(args)
        return
    run_or_exit(lambda: run_launched(args))
    exit_cleanly(0)


if __name__ == "__main__":
    main()
