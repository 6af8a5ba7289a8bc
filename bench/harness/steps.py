"""One configuration (model, dtype, method, mode) of a ZO or first-order step, measured in fresh workers.

Every configuration runs in a fresh worker process per rank (started by the launched rank), so
its peak RSS covers only its own life: imports, model creation (random weights, partitioned by
ZeRO-3 as the model is created), engine initialization, warm-up and the measured iterations. A
worker alternates steps and two plain forward passes, counts the bytes collectives move during
each, splits the step into phases, watches the host's CPU load, and writes a
:class:`WorkerResult`; the launched ranks gather them into a :class:`Row`.

bench/step_cost.py, bench/memory_vs_first_order.py and bench/scaling.py report these rows. A
worker is this module run as ``python -m harness.steps --worker …``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import torch
import torch.distributed as dist
from transformers.integrations import HfDeepSpeedConfig

import subzero_ds
import subzero_ds.phases
from subzero_ds.adapters import Tuning, add_adapter
from subzero_ds.config.subzero import drop_other_methods_keys
from subzero_ds.distributed import free_port, get_world_size_and_rank, init_distributed, log
from subzero_ds.loss import forward_loss, model_loss
from subzero_ds.methods.sparse_mezo import SparseDirection

from .collectives import CollectiveCounter
from .load import CpuUsage, other_load
from .methods import method_spec, zo_methods
from .models import DTYPES, MODELS, Batch, random_batch
from .report import write_json
from .workers import broadcast, exit_cleanly, peak_rss_mib, show_progress, timed

RSS_AFTER_IMPORTS_MIB = psutil.Process().memory_info().rss / 2**20
BENCH = Path(__file__).resolve().parents[1]  # bench/: the workers import this package from there

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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
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
    gathered_bytes: list[int] = field(default_factory=list)  # all-gathered during each measured step
    forward2_gathered_bytes: list[int] = field(default_factory=list)  # … during each pair of plain forwards
    reduced_bytes: list[int] = field(default_factory=list)  # all-reduced / reduce-scattered during each step
    rss_after_imports_mib: float = RSS_AFTER_IMPORTS_MIB
    built_peak_rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    peak_gpu_mib: float = 0.0  # torch.cuda.max_memory_allocated over the worker's life (0 on CPU)
    other_load: list[float] = field(default_factory=list)
    repeated: int = 0


def ds_config(configuration: Configuration, batch_size: int, subspace_rank: int) -> dict[str, Any]:
    """The DeepSpeed config: ZeRO-3 with a ``"subzero"`` section, or with AdamW for the first-order baseline.

    The first-order baseline is plain DeepSpeed: its ``"optimizer"`` block with ``torch_adam``
    (torch's AdamW; DeepSpeed's fused Adam needs CUDA, its CPU Adam is only chosen with offload).
    """
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": configuration.dtype == "bf16"},
        "steps_per_print": 1 << 30,
    }
    if configuration.method == FIRST_ORDER:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-7, "weight_decay": 0.0, "torch_adam": True}}
        config["zero_force_ds_cpu_optimizer"] = False
    else:
        config["subzero"] = drop_other_methods_keys({
            **ZO_METHODS[configuration.method], "lr": 1e-7, "eps": 1e-3, "rank": subspace_rank, "subspace_interval": 1000,
            "seed": 0, "fused": configuration.mode == "fused",
        })  # fmt: skip
    return config


def build_model(configuration: Configuration, config: dict[str, Any], tuning: str) -> torch.nn.Module:
    """The model with random weights, partitioned by ZeRO-3 as it is created, dropout off (eval mode)."""
    hf_ds_config = HfDeepSpeedConfig(config)  # noqa: F841 - alive while the model is created: ZeRO-3 init
    shape = MODELS[configuration.model]
    model = shape.model_class._from_config(shape.config(), dtype=DTYPES[configuration.dtype], attn_implementation="sdpa")
    return add_adapter(model, Tuning(tuning)).eval()


def build_first_order(args: argparse.Namespace, configuration: Configuration) -> Any:
    """Plain DeepSpeed ZeRO-3 with AdamW over the same model: the first-order baseline."""
    import deepspeed

    config = ds_config(configuration, args.batch_size, args.subspace_rank)
    model = build_model(configuration, config, args.tuning)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    return engine


def first_order_step(engine: Any, batch: Batch) -> float:
    """One first-order step: forward, backward (ZeRO-3 reduce-scatters the gradients), AdamW step."""
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    return float(loss.detach().float())


def build_engine(args: argparse.Namespace, configuration: Configuration) -> subzero_ds.SubZeroEngine:
    """Create the model partitioned by ZeRO-3 at construction and wrap it in a SubZeroEngine.

    The engine keeps its default loss (the LM loss, scored inside the LM head: the logits never
    exist whole); its step names its phases itself (:mod:`subzero_ds.phases`).
    """
    config = ds_config(configuration, args.batch_size, args.subspace_rank)
    model = build_model(configuration, config, args.tuning)
    return subzero_ds.initialize(model=model, config=config)


def two_forwards(model: torch.nn.Module, batch: Batch) -> None:
    """The limit of a two-point ZO step: two plain forward passes of the loss a ZO step computes (the
    engine's default, :func:`subzero_ds.loss.model_loss`), no perturbation, no update."""
    for _ in range(2):
        forward_loss(model_loss, model, batch)


def direction_pass(engine: subzero_ds.SubZeroEngine) -> None:
    """Generate this rank's slice of the current direction once, for every shard (into a scratch buffer)."""
    direction, step = engine.method.direction, engine.global_step
    reads_theta = isinstance(direction, SparseDirection)  # S-MeZO's mask is a function of θ: it must read it
    for shard in engine.shards:
        scratch = torch.empty(shard.local_numel, dtype=torch.float32, device=shard.device)
        if reads_theta:  # only then: swapping an NVMe shard in is no part of generating the others' directions
            with shard.swapped_in() as local:
                direction.apply_(scratch, local.float(), shard.name, shard.shape, step, shard.start, beta=1.0, alpha=1.0)
        else:
            direction.apply_(scratch, scratch, shard.name, shard.shape, step, shard.start, beta=0.0, alpha=1.0)


def measure(
    engine: Any, batch: Batch, args: argparse.Namespace, counter: CollectiveCounter, result: WorkerResult,
    first_order: bool,
) -> None:
    """Warm up, then alternate steps and plain forward pairs, recording every timing.

    An iteration during which other processes used more than ``--max-other-load`` of the host's
    CPU is measured again (at most ``--max-repeats`` times in all); every rank takes the same
    decision, since the load is agreed on collectively. The bytes the collectives move are
    counted during the step and during the forward pair, and the step's phases are the engine's
    own (:func:`subzero_ds.phases.recorded`).
    """
    bytes_of: dict[Callable[[], None], tuple[int, int]] = {}
    phase_s: dict[str, float] = {}

    def step() -> None:
        with subzero_ds.phases.recorded() as recorded:
            result.losses.append(first_order_step(engine, batch) if first_order else engine.step(batch).loss)
        phase_s.clear()
        phase_s.update(recorded)

    def forwards() -> None:
        two_forwards(engine.module, batch)

    def counted(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            counter.take()
            counter.active = True
            try:
                fn()
            finally:
                counter.active = False
                bytes_of[fn] = counter.take()

        return run

    iteration = 0
    while len(result.step_s) < args.steps:
        usage_start = CpuUsage.now()
        order = (step,) if args.no_forwards else (step, forwards) if iteration % 2 == 0 else (forwards, step)
        seconds = {fn: timed(counted(fn)) for fn in order}
        phases = {name: phase_s.get(name, 0.0) for name in PHASES}
        phases["other"] = seconds[step] - sum(t for name, t in phases.items() if name not in NESTED_PHASES)
        load = other_load(CpuUsage.since(usage_start))
        iteration += 1
        if iteration <= args.warmup:
            continue
        if load > args.max_other_load and result.repeated < args.max_repeats:
            result.repeated += 1
            log(f"step_cost: other processes used {load:.0%} of the CPU during an iteration; measuring it again")
            continue
        result.step_s.append(seconds[step])
        result.forward2_s.append(seconds.get(forwards, float("nan")))
        result.gathered_bytes.append(bytes_of[step][0])
        result.reduced_bytes.append(bytes_of[step][1])
        result.forward2_gathered_bytes.append(bytes_of.get(forwards, (-1, -1))[0])
        result.phases_s.append(phases)
        result.other_load.append(load)
        result.direction_s.append(float("nan") if first_order else timed(lambda: direction_pass(engine)))


def run_worker(args: argparse.Namespace) -> None:
    """Measure one configuration on this rank and write a :class:`WorkerResult` to ``--result``."""
    configuration = Configuration(args.model[0], args.dtype[0], args.method[0], args.mode[0])
    dtype, first_order = configuration.dtype, configuration.method == FIRST_ORDER
    torch.set_num_threads(args.threads)
    init_distributed()
    _, rank = get_world_size_and_rank()
    counter = CollectiveCounter()
    counter.install()
    engine = build_first_order(args, configuration) if first_order else build_engine(args, configuration)
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
    batch = {k: v.to(engine.device) for k, v in batch.items()}  # on the GPU once, as a data loader would put it
    measure(engine, batch, args, counter, result, first_order)
    result.peak_rss_mib = peak_rss_mib()
    result.peak_gpu_mib = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    args.result.write_text(json.dumps(asdict(result)))
    exit_cleanly(0)


# ---------------------------------------------------------------------------------------------
# Launched process: one per rank; starts the workers, gathers results, rank 0 writes the table
# ---------------------------------------------------------------------------------------------


def worker_command(args: argparse.Namespace, configuration: Configuration, result: Path) -> list[str]:
    """The command line of this rank's worker for one configuration."""
    return [
        sys.executable, "-m", "harness.steps", "--worker", "--result", str(result),
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
    port = broadcast(free_port() if dist.get_rank() == 0 else None)
    python_path = os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": python_path}
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        try:
            command = worker_command(args, configuration, result_path)
            completed = subprocess.run(command, env=env, timeout=args.config_timeout)
            failure = None if completed.returncode == 0 else f"exit status {completed.returncode}"
        except subprocess.TimeoutExpired:
            failure = f"no result after {args.config_timeout:.0f} s"
        finally:  # a killed worker leaves DeepSpeed's 66 MB /dev/shm buffer behind: remove it
            address, local_rank = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("LOCAL_RANK", "0")
            for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{address}_{port}_{local_rank}"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        result = json.loads(result_path.read_text()) if failure is None else {"failure": failure}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    failures = [f"rank {rank}: {r['failure']}" for rank, r in enumerate(gathered) if "failure" in r]
    if failures:
        raise RuntimeError(f"the {configuration.name} worker failed ({'; '.join(failures)}); see its log above")
    return gathered if dist.get_rank() == 0 else None


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



def main() -> None:
    """A worker: measure one configuration on this rank (``python -m harness.steps --worker …``)."""
    args = parse_args()
    show_progress()
    run_worker(args)  # never returns: ends the worker process


if __name__ == "__main__":
    main()
