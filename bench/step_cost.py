"""Cost of one zeroth-order step against its limit, two plain forward passes (2-rank ZeRO-3, CPU).

Run from the repository root (2 ranks, ZeRO-3, DeepSpeed picks its CPU accelerator and gloo):

    deepspeed --num_gpus 2 bench/step_cost.py

Options: ``--dtype fp32 bf16``, ``--method subzero mezo``, ``--batch-size 8``, ``--seq-len 128``,
``--steps 3``, ``--warmup 1``, ``--threads N`` (per rank), ``--output bench/results/step_cost.md``.
If port 29500 is taken, add ``--master_port <free port>`` after ``--num_gpus 2``.
The default batch is 8 × 128 tokens per rank, not 16 × 128: on 2 CPU cores the whole benchmark
takes about 4.5 minutes with 8 rows and about 10 with 16 (``--batch-size 16`` gives it back).

What it measures, for every (dtype, method) pair, on an OPT-shaped model of 125M parameters
(hidden 768, 12 layers, 12 heads, ffn 3072, vocab 50272) with random weights, partitioned by
ZeRO-3 as it is created (never whole on a rank), SDPA attention, no KV cache:

- **step s**: the median time of one ``engine.step(batch)`` (save a backup of the shard, perturb +,
  forward, perturb −, forward, all-reduce of the two losses, update, cache release);
- **2×forward s**: the median time of two plain ``engine.module(**batch)`` calls under
  ``torch.no_grad()`` on the same engine, model and batch: the floor for any two-point ZO method;
- **ratio**: step / 2×forward (target for SubZero: ≤ 1.15);
- **peak RSS** per rank, the part of it above the RSS right after the imports, and the peak
  already reached when the model is built and ``subzero_ds.initialize`` has returned.

Step and forward measurements alternate (step first on even iterations, forwards first on odd
ones), so drift hits both alike. Each timing starts after a barrier; an iteration counts as
the slower of the two ranks. The benchmark watches the host's CPU: an iteration during which
other processes used more than ``--max-other-load`` (10%) of it is measured again, and the
table reports the worst remaining load, so a run disturbed by other work says so. A second table splits the step into its phases (rank 0) and times
one pass of direction generation alone over this rank's shards (no write).

Every (dtype, method) pair runs in a fresh pair of worker processes (one per rank, started by
the launched processes), so its peak RSS covers only its own life: imports, model creation,
``subzero_ds.initialize``, warm-up and the measured iterations, and no earlier configuration.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import torch
import torch.distributed as dist
from transformers import OPTConfig, OPTForCausalLM
from transformers.integrations import HfDeepSpeedConfig

import subzero_ds
from subzero_ds.adapters import Tuning, add_adapter
from subzero_ds.distributed import free_port, get_world_size_and_rank, init_distributed, log

RSS_AFTER_IMPORTS_MIB = psutil.Process().memory_info().rss / 2**20

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ("subzero", "mezo")
TARGET_RATIO = 1.15
# Lowered from the intended 16 rows: with 16 the benchmark takes ~10 min on 2 CPU cores, ~4.5 with 8.
DEFAULT_BATCH_SIZE = 8
Batch = dict[str, torch.Tensor]

# The step's timed phases, in the order the breakdown table lists them; "other" is the rest.
PHASES = ("forward ×2", "backup copy", "perturb ×2", "update", "cache release")
BREAKDOWN = (*PHASES, "other")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options (the deepspeed launcher adds ``--local_rank``, accepted and ignored)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS))
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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.seq_len < 2:
        parser.error("need --steps >= 1, --warmup >= 0, --batch-size >= 1 and --seq-len >= 2")
    if args.threads <= 0:
        local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        args.threads = max(1, len(os.sched_getaffinity(0)) // max(1, local_ranks))
    return args


# ---------------------------------------------------------------------------------------------
# Worker: one (dtype, method) configuration on this rank, in a fresh process
# ---------------------------------------------------------------------------------------------


@dataclass
class WorkerResult:
    """What one rank measured for one configuration (written as JSON for the launched process)."""

    rank: int
    total_params: int
    step_s: list[float] = field(default_factory=list)
    forward2_s: list[float] = field(default_factory=list)
    phases_s: list[dict[str, float]] = field(default_factory=list)
    direction_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    rss_after_imports_mib: float = RSS_AFTER_IMPORTS_MIB
    built_peak_rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    other_load: list[float] = field(default_factory=list)
    repeated: int = 0


@dataclass(frozen=True)
class CpuUsage:
    """CPU seconds spent during the measured iterations: by this process, and by the whole host."""

    own_s: float
    host_busy_s: float
    wall_s: float
    host_cores: int

    @classmethod
    def since(cls, start: CpuUsage) -> CpuUsage:
        """The usage from ``start`` (a :meth:`now`) until now."""
        now = cls.now()
        return cls(
            own_s=now.own_s - start.own_s,
            host_busy_s=now.host_busy_s - start.host_busy_s,
            wall_s=now.wall_s - start.wall_s,
            host_cores=now.host_cores,
        )

    @classmethod
    def now(cls) -> CpuUsage:
        """Cumulative counters at this instant (differences of two are meaningful)."""
        own, host = psutil.Process().cpu_times(), psutil.cpu_times()
        idle = host.idle + getattr(host, "iowait", 0.0)
        return cls(own.user + own.system, sum(host) - idle - _guest_time(host), time.perf_counter(), psutil.cpu_count())


class PhaseTimer:
    """Accumulates wall time per named phase of the calls it wraps."""

    def __init__(self) -> None:
        self._totals: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with its wall time added to phase ``name`` on every call."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._totals[name] += time.perf_counter() - start

        return wrapper

    def take(self) -> dict[str, float]:
        """The totals since the last call, then reset."""
        totals = {name: self._totals.get(name, 0.0) for name in PHASES}
        self._totals.clear()
        return totals


def ds_config(dtype: str, method: str, batch_size: int, subspace_rank: int) -> dict[str, Any]:
    """The DeepSpeed config (ZeRO-3, no optimizer) with its ``"subzero"`` section."""
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == "bf16"},
        "steps_per_print": 1 << 30,
        "subzero": {
            "method": method, "lr": 1e-7, "eps": 1e-3, "rank": subspace_rank, "subspace_interval": 1000, "seed": 0,
        },
    }


def opt_125m_config() -> OPTConfig:
    """OPT-125M's shape (random weights are drawn later); no KV cache."""
    return OPTConfig(
        vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
        max_position_embeddings=2048, word_embed_proj_dim=768, use_cache=False,
    )


def build_engine(args: argparse.Namespace, dtype: str, method: str, timer: PhaseTimer) -> subzero_ds.SubZeroEngine:
    """Create the model partitioned by ZeRO-3 at construction and wrap it in a SubZeroEngine.

    The forward passes inside ``engine.step`` and the optimizer's and DeepSpeed's public
    methods the step calls are wrapped by ``timer``, so the step can be split into phases.
    """
    config = ds_config(dtype, method, args.batch_size, args.subspace_rank)
    hf_ds_config = HfDeepSpeedConfig(config)  # noqa: F841 - alive while the model is created: ZeRO-3 init
    model = OPTForCausalLM._from_config(opt_125m_config(), dtype=DTYPES[dtype], attn_implementation="sdpa")
    model = add_adapter(model, Tuning(args.tuning)).eval()

    def loss_fn(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return model(**batch).loss

    engine = subzero_ds.initialize(model=model, config=config, loss_fn=timer.wrap("forward ×2", loss_fn))
    optimizer = engine.optimizer
    optimizer.save_ = timer.wrap("backup copy", optimizer.save_)
    optimizer.perturb_ = timer.wrap("perturb ×2", optimizer.perturb_)
    optimizer.update_ = timer.wrap("update", optimizer.update_)
    zero = engine.ds_engine.optimizer
    zero.empty_partition_cache = timer.wrap("cache release", zero.empty_partition_cache)
    return engine


def random_batch(batch_size: int, seq_len: int, vocab: int, seed: int) -> Batch:
    """Random token ids (this rank's micro-batch), full attention mask, labels = inputs."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def two_forwards(model: torch.nn.Module, batch: Batch) -> None:
    """The limit of a two-point ZO step: two plain forward passes, no perturbation, no update."""
    with torch.no_grad():
        for _ in range(2):
            float(model(**batch).loss)


def direction_pass(engine: subzero_ds.SubZeroEngine) -> None:
    """Generate (and drop) this rank's slice of the current direction once, for every shard."""
    direction, step = engine.optimizer.direction, engine.global_step
    for shard in engine.shards:
        for _ in direction.chunks(shard.name, shard.shape, step, shard.start, shard.end):
            pass


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn`` takes on this rank, started right after a barrier so ranks start together."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    engine: subzero_ds.SubZeroEngine, batch: Batch, args: argparse.Namespace, timer: PhaseTimer, result: WorkerResult
) -> None:
    """Warm up, then alternate steps and plain forward pairs, recording every timing.

    An iteration during which other processes used more than ``--max-other-load`` of the host's
    CPU is measured again (at most ``--max-repeats`` times in all); every rank takes the same
    decision, since the load is agreed on collectively.
    """

    def step() -> None:
        result.losses.append(engine.step(batch).loss)

    def forwards() -> None:
        two_forwards(engine.module, batch)

    iteration = 0
    while len(result.step_s) < args.steps:
        usage_start = CpuUsage.now()
        timer.take()
        order = (step, forwards) if iteration % 2 == 0 else (forwards, step)
        seconds = {fn: timed(fn) for fn in order}
        phases = timer.take()
        phases["other"] = seconds[step] - sum(phases.values())
        load = other_load(CpuUsage.since(usage_start))
        iteration += 1
        if iteration <= args.warmup:
            continue
        if load > args.max_other_load and result.repeated < args.max_repeats:
            result.repeated += 1
            log(f"step_cost: other processes used {load:.0%} of the CPU during an iteration; measuring it again")
            continue
        result.step_s.append(seconds[step])
        result.forward2_s.append(seconds[forwards])
        result.phases_s.append(phases)
        result.other_load.append(load)
        result.direction_s.append(timed(lambda: direction_pass(engine)))


def other_load(usage: CpuUsage) -> float:
    """Share of the host's CPU capacity that processes other than the benchmark's workers used.

    Collective: every rank passes its own :class:`CpuUsage` over the same window and gets the
    same answer, for rank 0's host (host busy CPU seconds minus the CPU seconds of every worker on
    that host, over window × cores). Well above zero means other work competed for the cores.
    """
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (socket.gethostname(), usage))
    host, reference = gathered[0]
    own = sum(u.own_s for h, u in gathered if h == host)
    return max(0.0, reference.host_busy_s - own) / (reference.wall_s * reference.host_cores)


def _guest_time(host: Any) -> float:
    """Guest time is already counted in user time on Linux; drop it from the busy sum."""
    return getattr(host, "guest", 0.0) + getattr(host, "guest_nice", 0.0)


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(args: argparse.Namespace) -> None:
    """Measure one configuration on this rank and write a :class:`WorkerResult` to ``--result``."""
    (dtype,), (method,) = args.dtype, args.method
    torch.set_num_threads(args.threads)
    init_distributed()
    _, rank = get_world_size_and_rank()
    timer = PhaseTimer()
    engine = build_engine(args, dtype, method, timer)
    params = list(engine.module.parameters())
    # The model's own weights must be in the asked dtype; peft's LoRA factors, created after
    # ZeRO-3's construction-time partitioning, stay fp32 (DeepSpeed does not recast them).
    stored = {p.ds_tensor.dtype for p in params if args.tuning == "full" or not p.requires_grad}
    if stored != {DTYPES[dtype]}:
        raise RuntimeError(f"asked for {dtype} parameters, but ZeRO-3 stores them as {sorted(map(str, stored))}")
    result = WorkerResult(
        rank=rank, total_params=sum(int(p.ds_numel) for p in params), built_peak_rss_mib=peak_rss_mib()
    )
    batch = random_batch(args.batch_size, args.seq_len, engine.module.config.vocab_size, seed=rank)
    measure(engine, batch, args, timer, result)
    result.peak_rss_mib = peak_rss_mib()
    args.result.write_text(json.dumps(asdict(result)))
    exit_cleanly(0)


# ---------------------------------------------------------------------------------------------
# Launched process: one per rank; starts the workers, gathers results, rank 0 writes the table
# ---------------------------------------------------------------------------------------------


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def worker_command(args: argparse.Namespace, dtype: str, method: str, result: Path) -> list[str]:
    """The command line of this rank's worker for one configuration."""
    return [
        sys.executable, os.path.abspath(__file__), "--worker", "--result", str(result),
        "--dtype", dtype, "--method", method, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
        "--subspace-rank", str(args.subspace_rank), "--tuning", args.tuning, "--max-other-load", str(args.max_other_load),
        "--max-repeats", str(args.max_repeats),
    ]  # fmt: skip


def run_configuration(args: argparse.Namespace, dtype: str, method: str) -> list[dict[str, Any]] | None:
    """Run one configuration in fresh worker processes (one per rank) and gather their results.

    Returns:
        Every rank's :class:`WorkerResult` as a dict on rank 0 (None elsewhere).

    Raises:
        RuntimeError: a worker failed or timed out on some rank.
    """
    port = broadcast(free_port() if dist.get_rank() == 0 else None)
    env = {**os.environ, "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        try:
            command = worker_command(args, dtype, method, result_path)
            completed = subprocess.run(command, env=env, timeout=args.config_timeout)
            failure = None if completed.returncode == 0 else f"exit status {completed.returncode}"
        except subprocess.TimeoutExpired:
            failure = f"no result after {args.config_timeout:.0f} s"
        result = json.loads(result_path.read_text()) if failure is None else {"failure": failure}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    failures = [f"rank {rank}: {r['failure']}" for rank, r in enumerate(gathered) if "failure" in r]
    if failures:
        raise RuntimeError(f"the {dtype}/{method} worker failed ({'; '.join(failures)}); see its log above")
    return gathered if dist.get_rank() == 0 else None


@dataclass(frozen=True)
class Row:
    """One configuration's summary across ranks."""

    dtype: str
    method: str
    total_params: int
    step_s: float
    forward2_s: float
    step_spread: tuple[float, float]
    forward2_spread: tuple[float, float]
    phases_s: dict[str, float]
    rank0_step_s: float
    direction_s: float
    peak_rss_mib: list[float]
    above_imports_mib: list[float]
    built_peak_rss_mib: list[float]
    rss_after_imports_mib: list[float]
    other_load: float
    repeated: int

    @property
    def ratio(self) -> float:
        """Step time over the two-forward limit."""
        return self.step_s / self.forward2_s


def summarize(dtype: str, method: str, ranks: list[dict[str, Any]]) -> Row:
    """Medians over iterations of the slower rank per iteration; phases from rank 0."""
    step = [max(values) for values in zip(*(r["step_s"] for r in ranks))]
    forward2 = [max(values) for values in zip(*(r["forward2_s"] for r in ranks))]
    rank0 = ranks[0]
    phases = {name: statistics.median(p[name] for p in rank0["phases_s"]) for name in BREAKDOWN}
    return Row(
        dtype=dtype,
        method=method,
        total_params=rank0["total_params"],
        step_s=statistics.median(step),
        forward2_s=statistics.median(forward2),
        step_spread=(min(step), max(step)),
        forward2_spread=(min(forward2), max(forward2)),
        phases_s=phases,
        rank0_step_s=statistics.median(rank0["step_s"]),
        direction_s=statistics.median(rank0["direction_s"]),
        peak_rss_mib=[r["peak_rss_mib"] for r in ranks],
        above_imports_mib=[r["peak_rss_mib"] - r["rss_after_imports_mib"] for r in ranks],
        built_peak_rss_mib=[r["built_peak_rss_mib"] for r in ranks],
        rss_after_imports_mib=[r["rss_after_imports_mib"] for r in ranks],
        other_load=max(rank0["other_load"]),
        repeated=rank0["repeated"],
    )


def per_rank(values: list[float]) -> str:
    """MiB values of every rank, "r0 / r1 / …"."""
    return " / ".join(f"{v:,.0f}" for v in values)


def batch_note(batch_size: int) -> str:
    """Why the default batch is what it is, when the run uses it."""
    if batch_size != DEFAULT_BATCH_SIZE:
        return ""
    return (
        " (the default, lowered from 16 × 128: with 16 rows the whole benchmark takes about 10 min on 2 CPU "
        "cores instead of about 4.5; `--batch-size 16` gives it back)"
    )


def command_line(world_size: int) -> str:
    """The launcher command that reproduces this run (the launcher's own ``--local_rank`` left out)."""
    options = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    return " ".join(["deepspeed", "--num_gpus", str(world_size), "bench/step_cost.py", *options])


def markdown_report(rows: list[Row], args: argparse.Namespace, world_size: int, wall_s: float) -> str:
    """The results as Markdown: the main table, the phase breakdown and how they were measured."""
    verdicts = [
        f"{r.dtype} {r.ratio:.3f}× ({'met' if r.ratio <= TARGET_RATIO else 'missed'})"
        for r in rows
        if r.method == "subzero"
    ]
    lines = [
        "# ZO step cost vs. two plain forward passes",
        "",
        f"Command: `{command_line(world_size)}`",
        f"Tuning: {args.tuning}. Model: OPT-125M shape ({rows[0].total_params / 1e6:.1f}M parameters, random weights), ZeRO-3 over "
        f"{world_size} ranks, CPU + gloo, {args.threads} torch thread(s) per rank, SDPA, no KV cache. "
        f"Batch {args.batch_size} × {args.seq_len} tokens per rank{batch_note(args.batch_size)}. "
        f"{args.warmup} warm-up + {args.steps} measured iterations; step and 2×forward interleaved, each timed "
        "after a barrier; per iteration the slower rank; median over iterations (min–max in brackets). "
        f"Wall time {wall_s / 60:.1f} min (rank 0, from its start to this report).",
        "",
        "| dtype | method | step s | 2×forward s | ratio | peak RSS MiB per rank | above imports MiB per rank "
        "| peak once built MiB per rank | other CPU load (repeats) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.dtype} | {r.method} | {r.step_s:.2f} [{r.step_spread[0]:.2f}–{r.step_spread[1]:.2f}] "
            f"| {r.forward2_s:.2f} [{r.forward2_spread[0]:.2f}–{r.forward2_spread[1]:.2f}] | {r.ratio:.3f} "
            f"| {per_rank(r.peak_rss_mib)} | {per_rank(r.above_imports_mib)} | {per_rank(r.built_peak_rss_mib)} "
            f"| {r.other_load:.0%} ({r.repeated}) |"
        )
    lines += [
        "",
        f"Target: SubZero ≤ {TARGET_RATIO}× the two-forward limit: {', '.join(verdicts) or 'SubZero not run'}.",
        "Peak RSS (`ru_maxrss`) covers the whole life of a fresh worker process per configuration: imports, "
        "model creation (partitioned at construction), `subzero_ds.initialize`, warm-up and every measured "
        "step and forward pair. 'Above imports' subtracts the RSS right after the imports "
        f"({per_rank(rows[0].rss_after_imports_mib)} MiB for the first configuration); 'peak once built' is the "
        "peak reached by the end of `subzero_ds.initialize`, before any forward pass. 'Other CPU load' is the "
        "largest share of the host's CPU time used by processes other than the benchmark's workers during a "
        f"measured iteration; an iteration above {args.max_other_load:.0%} was measured again (repeats in "
        "brackets, at most `--max-repeats`). If it is still more than a few percent, something else competed "
        "for the cores and the timings are suspect: run again on a quiet machine.",
        "",
        "## Where the step time goes (rank 0, median seconds per step)",
        "",
        "| dtype | method | step | " + " | ".join(BREAKDOWN) + " | direction generation, one pass |",
        "|---|---|---|" + "---|" * (len(BREAKDOWN) + 1),
    ]
    for r in rows:
        phases = " | ".join(f"{r.phases_s[name]:.3f}" for name in BREAKDOWN)
        lines.append(f"| {r.dtype} | {r.method} | {r.rank0_step_s:.2f} | {phases} | {r.direction_s:.3f} |")
    lines += [
        "",
        "'forward ×2' are the two loss forwards inside the step; 'perturb ×2' and 'update' each regenerate the "
        "direction and write the shard from the backup; 'cache release' is `empty_partition_cache` (called after each "
        "write); 'other' is the rest of rank 0's step, mostly the loss all-reduce, which waits for the slower rank. "
        "'Direction generation, one pass' times generating this rank's slice of D_t alone, "
        "once, without writing it: perturb and update each do it once.",
    ]
    return "\n".join(lines) + "\n"


def run_launched(args: argparse.Namespace) -> None:
    """Run every configuration, then rank 0 prints the report and writes it to ``--output``."""
    init_distributed()
    rows: list[Row] = []
    for dtype in args.dtype:
        for method in args.method:
            log(f"step_cost: {dtype}/{method}, {dist.get_world_size()} ranks, batch {args.batch_size}×{args.seq_len}")
            gathered = run_configuration(args, dtype, method)
            if gathered is not None:
                rows.append(summarize(dtype, method, gathered))
    if dist.get_rank() == 0:
        report = markdown_report(rows, args, dist.get_world_size(), time.time() - psutil.Process().create_time())
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
        print(report, flush=True)
        log(f"step_cost: report written to {args.output}")


def exit_cleanly(status: int) -> None:
    """Barrier, tear the process group down, and leave without interpreter teardown.

    A 2-rank ZeRO-3 process sometimes aborts at interpreter exit ("terminate called without an
    active exception"); ``os._exit`` right after ``destroy_process_group`` avoids it.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main() -> None:
    """Entry point of the launched process and of the workers it starts."""
    args = parse_args()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger("subzero_ds").addHandler(handler)
    logging.getLogger("subzero_ds").setLevel(logging.INFO)
    if args.worker:
        run_worker(args)  # never returns: ends the worker process
    try:
        run_launched(args)
    except RuntimeError as error:
        log(str(error), all_ranks=True)
        exit_cleanly(1)
    exit_cleanly(0)


if __name__ == "__main__":
    main()
