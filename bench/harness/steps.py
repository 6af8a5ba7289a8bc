"""Configurations (model, dtype, method, mode) of a ZO or first-order step, each measured in fresh workers.

Every configuration runs in a fresh worker process per rank (``harness/step_worker.py``, started
by the launched rank), so its peak RSS covers only its own life: imports, model creation (random
weights, partitioned by ZeRO-3 as the model is created), engine initialization, warm-up and the
measured iterations. The launched ranks gather the workers' results into a :class:`Row`.

bench/step_cost.py, bench/memory_vs_first_order.py and bench/scaling.py report these rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

import subzero_ds.phases
from subzero_ds.distributed import log

from .methods import method_spec, zo_methods
from .models import DTYPES, MODELS
from .report import device_note, write_json
from .workers import run_fresh_workers

FIRST_ORDER = "first-order"
# --method name -> its "subzero" settings: every registered method and update rule (harness/methods.py).
ZO_METHODS = zo_methods()
UNFUSED = {name for name in ZO_METHODS if not method_spec(name).fusable}  # no fused ± pass
METHODS = (*ZO_METHODS, FIRST_ORDER)
MODES = ("in-place", "fused")

# Lowered from the intended 16 rows: with 16 the benchmark takes ~10 min on 2 CPU cores, ~4.5 with 8.
DEFAULT_BATCH_SIZE = 8

# The step's named phases (subzero_ds.phases), in the order the breakdown table lists them; "other" is the
# rest of the step. A phase recorded inside another is not subtracted again: ZeRO-3's cache release
# happens inside the write (perturb, restore, update) that left a gathered copy stale (writer.py).
PHASES = subzero_ds.phases.PHASES
NESTED_PHASES = ("cache release",)
BREAKDOWN = (*PHASES, "other")

@dataclass(frozen=True)
class Configuration:
    """One measured configuration; ``mode`` is None for the first-order baseline."""

    model: str
    dtype: str
    method: str
    mode: str | None

    @property
    def name(self) -> str:
        return "/".join(x for x in (self.model, self.dtype, self.method, self.mode) if x)


def configurations(args: argparse.Namespace) -> list[Configuration]:
    """Every (model, dtype, method, mode) asked for, in that nesting order; first-order runs once per (model, dtype)."""
    return [
        Configuration(model, dtype, method, None if method == FIRST_ORDER else mode)
        for model in args.model
        for dtype in args.dtype
        for method in args.method
        for mode in (args.mode if method not in (FIRST_ORDER, *UNFUSED) else ["in-place"] if method in UNFUSED
                     else args.mode[:1])
    ]

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None, description: str | None = None, **defaults: Any) -> argparse.Namespace:
    """The benchmark's options (the deepspeed launcher adds ``--local_rank``, accepted and ignored).

    ``defaults`` override the defaults (bench/memory_vs_first_order.py and bench/scaling.py use this).
    """
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--model", nargs="+", choices=list(MODELS), default=["opt"],
                        help="opt: OPT-125M shape; llama: LLaMA-shaped 134M; opt-7m/opt-30m/opt-350m: scaling sizes")
    parser.add_argument("--method", nargs="+", choices=METHODS, default=["subzero", "mezo"],
                        help=f"ZO methods, and/or {FIRST_ORDER}: plain DeepSpeed ZeRO-3 + AdamW (forward, backward, step)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES),
                        help='ZO mode: in-place perturbation ("fused": false) or the fused ± pass ("fused": true)')
    parser.add_argument("--no-forwards", action="store_true",
                        help="skip the two-plain-forwards timing (memory and scaling runs: the step alone)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per rank (see module doc)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    parser.add_argument("--steps", type=int, default=3, help="measured iterations per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured iterations first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / local ranks)")
    parser.add_argument("--subspace-rank", type=int, default=24, help="SubZero subspace rank r")
    parser.add_argument("--tuning", choices=["full", "lora"], default="full",
                        help="full fine-tuning, or LoRA (q_proj/v_proj, r=8) on the frozen model")
    parser.add_argument("--output", type=Path, default=Path("bench/results/step_cost.md"))
    parser.add_argument(
        "--max-other-load", type=float, default=0.1, help="repeat an iteration if other processes used more CPU"
    )
    parser.add_argument("--max-repeats", type=int, default=6, help="repeated iterations allowed per configuration")
    parser.add_argument("--config-timeout", type=float, default=1800.0, help="seconds before a worker is killed")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.seq_len < 2:
        parser.error("need --steps >= 1, --warmup >= 0, --batch-size >= 1 and --seq-len >= 2")
    if args.threads <= 0:
        local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        args.threads = max(1, len(os.sched_getaffinity(0)) // max(1, local_ranks))
    return args


# ---------------------------------------------------------------------------------------------
# Launched process: one per rank; starts the workers, gathers their results into rows
# ---------------------------------------------------------------------------------------------


def worker_command(args: argparse.Namespace, configuration: Configuration) -> list[str]:
    """The command line of this rank's worker for one configuration."""
    return [
        sys.executable, "-m", "harness.step_worker",
        "--model", configuration.model, "--dtype", configuration.dtype, "--method", configuration.method,
        "--mode", configuration.mode or MODES[0], "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
        "--subspace-rank", str(args.subspace_rank), "--tuning", args.tuning, "--max-other-load", str(args.max_other_load),
        "--max-repeats", str(args.max_repeats), *(["--no-forwards"] if args.no_forwards else []),
    ]  # fmt: skip


def run_configuration(args: argparse.Namespace, configuration: Configuration) -> list[dict[str, Any]] | None:
    """Run one configuration in fresh worker processes (one per rank) and gather their results.

    Returns:
        Every rank's :class:`WorkerResult` as a dict on rank 0 (None elsewhere).

    Raises:
        RuntimeError: a worker failed or timed out on some rank.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    return run_fresh_workers(worker_command(args, configuration), env, args.config_timeout, configuration.name)


@dataclass(frozen=True)
class Row:
    """One configuration's summary across ranks."""

    configuration: Configuration
    total_params: int
    step_s: float
    forward2_s: float
    step_spread: tuple[float, float]
    forward2_spread: tuple[float, float]
    phases_s: dict[str, float]
    rank0_step_s: float
    direction_s: float
    gathered_mib: float  # per step, per rank (the largest over ranks and steps)
    forward2_gathered_mib: float
    reduced_mib: float
    peak_rss_mib: list[float]
    peak_gpu_mib: list[float]
    above_imports_mib: list[float]
    built_peak_rss_mib: list[float]
    rss_after_imports_mib: list[float]
    other_load: float
    repeated: int

    @property
    def ratio(self) -> float:
        """Step time over the two-forward limit."""
        return self.step_s / self.forward2_s

    @property
    def max_above_imports_mib(self) -> float:
        """The larger rank's peak RSS above its post-import RSS."""
        return max(self.above_imports_mib)

    @property
    def forwards(self) -> int:
        """Forward passes of the method's step (the registry's ``forwards_per_step``; 2 for first-order)."""
        method = self.configuration.method
        return 2 if method == FIRST_ORDER else method_spec(method).forwards_per_step()

    @property
    def limit_ratio(self) -> float:
        """Step time over as many plain forwards as the step takes (:attr:`forwards`)."""
        return self.ratio * 2 / self.forwards


def summarize(configuration: Configuration, ranks: list[dict[str, Any]]) -> Row:
    """Medians over iterations of the slower rank per iteration; phases from rank 0."""
    step = [max(values) for values in zip(*(r["step_s"] for r in ranks))]
    forward2 = [max(values) for values in zip(*(r["forward2_s"] for r in ranks))]
    rank0 = ranks[0]
    phases = {name: statistics.median(p[name] for p in rank0["phases_s"]) for name in BREAKDOWN}

    def mib(key: str) -> float:
        return max(max(r[key]) for r in ranks) / 2**20

    return Row(
        configuration=configuration,
        total_params=rank0["total_params"],
        step_s=statistics.median(step),
        forward2_s=statistics.median(forward2),
        step_spread=(min(step), max(step)),
        forward2_spread=(min(forward2), max(forward2)),
        phases_s=phases,
        rank0_step_s=statistics.median(rank0["step_s"]),
        direction_s=statistics.median(rank0["direction_s"]),
        gathered_mib=mib("gathered_bytes"),
        forward2_gathered_mib=mib("forward2_gathered_bytes"),
        reduced_mib=mib("reduced_bytes"),
        peak_rss_mib=[r["peak_rss_mib"] for r in ranks],
        peak_gpu_mib=[r.get("peak_gpu_mib", 0.0) for r in ranks],
        above_imports_mib=[r["peak_rss_mib"] - r["rss_after_imports_mib"] for r in ranks],
        built_peak_rss_mib=[r["built_peak_rss_mib"] for r in ranks],
        rss_after_imports_mib=[r["rss_after_imports_mib"] for r in ranks],
        other_load=max(rank0["other_load"]),
        repeated=rank0["repeated"],
    )


def method_label(configuration: Configuration) -> str:
    """'subzero', 'mezo' or 'first-order (AdamW)'."""
    return "first-order AdamW" if configuration.method == FIRST_ORDER else configuration.method


def models_note(rows: list[Row]) -> str:
    """One sentence per model: its shape and its parameter count."""
    seen: dict[str, int] = {}
    for r in rows:
        seen.setdefault(r.configuration.model, r.total_params)
    return " ".join(f"`{m}`: {MODELS[m].label}, {n / 1e6:.1f}M parameters." for m, n in seen.items())


def setup_note(rows: list[Row], args: argparse.Namespace, world_size: int, wall_s: float) -> str:
    """How the rows were measured: models, ranks, device, threads, batch, iterations, wall time."""
    forwards = "" if args.no_forwards else "; step and 2×forward interleaved, each timed after a barrier"
    return (f"Tuning: {args.tuning}. Models (random weights): {models_note(rows)} ZeRO-3 over {world_size} ranks, "
            f"{device_note()}, {args.threads} torch thread(s) per rank, SDPA, no KV cache. Batch {args.batch_size} × "
            f"{args.seq_len} tokens per rank. {args.warmup} warm-up + {args.steps} measured iterations per fresh "
            f"worker process{forwards}; per iteration the slower rank; median over iterations. "
            f"Wall time {wall_s / 60:.1f} min (rank 0, from its start to this report).")


def load_note(args: argparse.Namespace) -> str:
    """What the 'other CPU load' column means (the load guard)."""
    return ("'Other CPU load' is the largest share of the host's CPU time used by processes other than the "
            f"benchmark's workers during a measured iteration; an iteration above {args.max_other_load:.0%} was "
            "measured again (repeats in brackets, at most `--max-repeats`). If it is still more than a few percent, "
            "something else competed for the cores and the timings are suspect: run again on a quiet machine.")


def run_all(args: argparse.Namespace) -> list[Row]:
    """Run every configuration asked for in fresh workers; the rows on rank 0 (empty elsewhere)."""
    rows: list[Row] = []
    for configuration in configurations(args):
        log(f"{Path(sys.argv[0]).name}: {configuration.name}, {dist.get_world_size()} ranks, "
            f"batch {args.batch_size}×{args.seq_len}")
        gathered = run_configuration(args, configuration)
        if gathered is not None:
            rows.append(summarize(configuration, gathered))
            write_json(rows, args.output.with_suffix(".json"))  # partial results survive an interrupted run
    return rows
