"""Cost of one zeroth-order step against its limit, two plain forward passes (2-rank ZeRO-3, CPU).

Run from the repository root (2 ranks, ZeRO-3, DeepSpeed picks its CPU accelerator and gloo):

    deepspeed --num_gpus 2 bench/step_cost.py

Options: ``--model opt llama`` (and the scaling sizes ``opt-7m opt-30m opt-350m``, ``opt-tiny``
for smoke tests), ``--dtype fp32 bf16``, ``--method subzero mezo first-order``, ``--mode in-place
fused``, ``--batch-size 8``, ``--seq-len 128``, ``--steps 3``, ``--warmup 1``, ``--threads N`` (per
rank), ``--no-forwards`` (time the step alone), ``--output bench/results/step_cost.md`` (a ``.json``
of the rows is written next to it after every configuration).
If port 29500 is taken, add ``--master_port <free port>`` after ``--num_gpus 2``.
The default batch is 8 × 128 tokens per rank, not 16 × 128: on 2 CPU cores each 125M
configuration takes about 1.3 minutes with 16 rows (``--batch-size 16``, as in BENCHMARKS.md).

What it measures, for every (model, dtype, method, mode), with random weights partitioned by
ZeRO-3 as the model is created (never whole on a rank), SDPA attention, no KV cache:

- **step s**: the median time of one ``engine.step(batch)``. In-place mode (``"fused": false``):
  save a backup of the shard, perturb +, forward, perturb −, forward, all-reduce of the two
  losses, update, cache release. Fused mode (``"fused": true``): one forward over [B; B] with the
  ± side paths, the all-reduce, the update. ``first-order``: plain DeepSpeed ZeRO-3 with AdamW
  (forward, ``backward``, ``step``), the baseline of bench/memory_vs_first_order.py and
  bench/scaling.py;
- **2×forward s**: the median time of two plain ``engine.module(**batch)`` calls under
  ``torch.no_grad()`` on the same engine, model and batch: the floor for any two-point ZO method;
- **ratio**: step / 2×forward (targets for SubZero: in-place ≤ 1.15, fused ≤ 1.0);
- **all-gathered bytes** per step (and per forward pair), counted by wrapping the collectives of
  DeepSpeed's communication backend and of ``torch.distributed`` in the worker while the step
  runs (:class:`CollectiveCounter`); the report gives fused ÷ in-place (target ≤ 0.55);
- **peak RSS** per rank, the part of it above the RSS right after the imports, and the peak
  already reached when the model is built and the engine initialized.

Step and forward measurements alternate (step first on even iterations, forwards first on odd
ones), so drift hits both alike. Each timing starts after a barrier; an iteration counts as
the slower of the two ranks. The benchmark watches the host's CPU: an iteration during which
other processes used more than ``--max-other-load`` (10%) of it is measured again (at most
``--max-repeats`` times), and the table reports the worst remaining load, so a run disturbed by
other work says so. A second table splits the step into its phases (rank 0) and times one pass
of direction generation alone over this rank's shards (no write).

Every configuration runs in a fresh pair of worker processes (one per rank, started by the
launched processes), so its peak RSS covers only its own life: imports, model creation, engine
initialization, warm-up and the measured iterations, and no earlier configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
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
from typing import Any, Callable, TypeVar

import psutil
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.integrations import HfDeepSpeedConfig

import subzero_ds
from subzero_ds.adapters import Tuning, add_adapter
from subzero_ds.config.subzero import drop_other_methods_keys
from subzero_ds.distributed import exit_process, free_port, get_world_size_and_rank, init_distributed, log
from subzero_ds.methods.sparse_mezo import SparseDirection

RSS_AFTER_IMPORTS_MIB = psutil.Process().memory_info().rss / 2**20

T = TypeVar("T")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FIRST_ORDER = "first-order"
# --method name -> its "subzero" settings (subzero_ds.methods: every method of the family).
ZO_METHODS = {
    "subzero": {"method": "subzero"}, "mezo": {"method": "mezo"},
    "subzero-momentum": {"method": "subzero", "update": "momentum"}, "subzero-adam": {"method": "subzero", "update": "adam"},
    "mezo-adam": {"method": "mezo", "update": "adam"}, "hizoo": {"method": "hizoo"},
    "sparse_mezo": {"method": "sparse_mezo"},
}
UNFUSED = {"hizoo", "sparse_mezo"}  # no fused ± pass
METHODS = (*ZO_METHODS, FIRST_ORDER)
MODES = ("in-place", "fused")
# Targets of the issue: SubZero step / two plain forwards, and fused / in-place all-gathered bytes.
TARGET_RATIO = {"in-place": 1.15, "fused": 1.0}
TARGET_GATHER_RATIO = 0.55
# Lowered from the intended 16 rows: with 16 the benchmark takes ~10 min on 2 CPU cores, ~4.5 with 8.
DEFAULT_BATCH_SIZE = 8
Batch = dict[str, torch.Tensor]

# The step's timed phases, in the order the breakdown table lists them; "other" is the rest.
PHASES = ("forward ×2", "backup copy", "perturb ×2", "update", "cache release")
BREAKDOWN = (*PHASES, "other")


# ---------------------------------------------------------------------------------------------
# Models: random weights, partitioned by ZeRO-3 at construction
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """A model family and shape to build with random weights."""

    label: str
    model_class: type[PreTrainedModel]
    config: Callable[[], PretrainedConfig]


def _opt(hidden: int, layers: int, heads: int, project: int | None = None) -> Callable[[], OPTConfig]:
    """An OPT shape (vocabulary 50272, ffn 4 × hidden), no KV cache."""
    return lambda: OPTConfig(
        vocab_size=50272, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden, num_attention_heads=heads,
        max_position_embeddings=2048, word_embed_proj_dim=project or hidden, use_cache=False,
    )  # fmt: skip


def _llama_134m() -> LlamaConfig:
    """LLaMA-shaped, close to OPT-125M in size: hidden 768, 12 layers, 12 heads, SwiGLU 2048, vocab 32000, untied."""
    return LlamaConfig(
        vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
        intermediate_size=2048, max_position_embeddings=2048, tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip


MODELS: dict[str, ModelShape] = {
    "opt": ModelShape("OPT-125M shape (hidden 768, 12 layers, ffn 3072, vocab 50272, tied)", OPTForCausalLM, _opt(768, 12, 12)),
    "llama": ModelShape("LLaMA shape (hidden 768, 12 layers, SwiGLU 2048, vocab 32000, untied)", LlamaForCausalLM, _llama_134m),
    "opt-tiny": ModelShape("OPT shape, hidden 64, 2 layers (smoke tests)", OPTForCausalLM, _opt(64, 2, 2)),
    "opt-7m": ModelShape("OPT shape, hidden 128, 4 layers", OPTForCausalLM, _opt(128, 4, 4)),
    "opt-30m": ModelShape("OPT shape, hidden 384, 6 layers", OPTForCausalLM, _opt(384, 6, 6)),
    "opt-350m": ModelShape("OPT-350M shape (hidden 1024, 24 layers, projections 512)", OPTForCausalLM, _opt(1024, 24, 16, 512)),
    "opt-1.3b": ModelShape("OPT-1.3B shape (hidden 2048, 24 layers, ffn 8192, vocab 50272, tied)", OPTForCausalLM, _opt(2048, 24, 32)),
}  # fmt: skip


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


class CollectiveCounter:
    """Counts the bytes that collectives move while :attr:`active` (per rank, this process).

    Wraps the gathers and reductions of DeepSpeed's communication backend (``deepspeed.comm``'s
    ``cdb``: ZeRO-3's parameter gathers go through it) and of ``torch.distributed`` (anything
    that calls it directly). Nested calls (DeepSpeed's backend calling torch) count once.
    An all-gather counts its output: the whole gathered tensor that lands on this rank. A
    reduction counts its input.
    """

    # name -> (bytes moved, gather?) from the call's positional and keyword arguments
    _SIZES: dict[str, tuple[Callable[[tuple, dict], int], bool]] = {
        "all_gather": (lambda a, k: _nbytes(k.get("tensor_list", a[0] if a else None)), True),
        "all_gather_into_tensor": (lambda a, k: _nbytes(k.get("output_tensor", a[0] if a else None)), True),
        "all_gather_single": (lambda a, k: _nbytes(k.get("output_tensor", a[0] if a else None)), True),
        "all_gather_base": (lambda a, k: _nbytes(k.get("output_tensor", a[0] if a else None)), True),
        "_all_gather_base": (lambda a, k: _nbytes(k.get("output_tensor", a[0] if a else None)), True),
        "all_gather_coalesced": (lambda a, k: _nbytes(k.get("output_tensors", a[0] if a else None)), True),
        "all_reduce": (lambda a, k: _nbytes(k.get("tensor", a[0] if a else None)), False),
        "reduce_scatter_tensor": (lambda a, k: _nbytes(k.get("input_tensor", a[1] if len(a) > 1 else None)), False),
        "reduce_scatter": (lambda a, k: _nbytes(k.get("input_list", a[1] if len(a) > 1 else None)), False),
        "all_reduce_coalesced": (lambda a, k: _nbytes(k.get("tensors", a[0] if a else None)), False),
    }

    def __init__(self) -> None:
        self.active = False
        self.gathered = self.reduced = 0
        self._depth = 0

    def install(self) -> None:
        """Wrap the collectives (after ``init_distributed``: DeepSpeed's backend exists then)."""
        import deepspeed.comm.comm as ds_comm

        for owner in (ds_comm.cdb, torch.distributed, torch.distributed.distributed_c10d):
            for name, (size, gather) in self._SIZES.items():
                fn = getattr(owner, name, None)
                if callable(fn):
                    setattr(owner, name, self._wrap(fn, size, gather))

    def _wrap(self, fn: Callable[..., Any], size: Callable[[tuple, dict], int], gather: bool) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.active and self._depth == 0:
                moved = size(args, kwargs)
                if gather:
                    self.gathered += moved
                else:
                    self.reduced += moved
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def take(self) -> tuple[int, int]:
        """(gathered, reduced) bytes since the last call, then reset."""
        counts = (self.gathered, self.reduced)
        self.gathered = self.reduced = 0
        return counts


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


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
            synchronize()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize()
                self._totals[name] += time.perf_counter() - start

        return wrapper

    def take(self) -> dict[str, float]:
        """The totals since the last call, then reset."""
        totals = {name: self._totals.get(name, 0.0) for name in PHASES}
        self._totals.clear()
        return totals


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


def build_engine(args: argparse.Namespace, configuration: Configuration, timer: PhaseTimer) -> subzero_ds.SubZeroEngine:
    """Create the model partitioned by ZeRO-3 at construction and wrap it in a SubZeroEngine.

    The forward passes inside ``engine.step`` and the optimizer's and DeepSpeed's public
    methods the step calls are wrapped by ``timer``, so the step can be split into phases.
    """
    config = ds_config(configuration, args.batch_size, args.subspace_rank)
    model = build_model(configuration, config, args.tuning)

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
    """Generate this rank's slice of the current direction once, for every shard (into a scratch buffer)."""
    direction, step = engine.optimizer.direction, engine.global_step
    reads_theta = isinstance(direction, SparseDirection)  # S-MeZO's mask is a function of θ: it must read it
    for shard in engine.shards:
        scratch = torch.empty(shard.local_numel, dtype=torch.float32, device=shard.device)
        if reads_theta:  # only then: swapping an NVMe shard in is no part of generating the others' directions
            with shard.swapped_in() as local:
                direction.apply_(scratch, local.float(), shard.name, shard.shape, step, shard.start, beta=1.0, alpha=1.0)
        else:
            direction.apply_(scratch, scratch, shard.name, shard.shape, step, shard.start, beta=0.0, alpha=1.0)


def synchronize() -> None:
    """Wait for this rank's queued GPU work (a no-op on CPU), so wall times cover the kernels."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn`` takes on this rank (its GPU work included), started right after a barrier."""
    synchronize()
    dist.barrier()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def measure(
    engine: Any, batch: Batch, args: argparse.Namespace, timer: PhaseTimer, counter: CollectiveCounter,
    result: WorkerResult, first_order: bool,
) -> None:
    """Warm up, then alternate steps and plain forward pairs, recording every timing.

    An iteration during which other processes used more than ``--max-other-load`` of the host's
    CPU is measured again (at most ``--max-repeats`` times in all); every rank takes the same
    decision, since the load is agreed on collectively. The bytes the collectives move are
    counted during the step and during the forward pair.
    """
    bytes_of: dict[Callable[[], None], tuple[int, int]] = {}

    def step() -> None:
        result.losses.append(first_order_step(engine, batch) if first_order else engine.step(batch).loss)

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
        timer.take()
        order = (step,) if args.no_forwards else (step, forwards) if iteration % 2 == 0 else (forwards, step)
        seconds = {fn: timed(counted(fn)) for fn in order}
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
        result.forward2_s.append(seconds.get(forwards, float("nan")))
        result.gathered_bytes.append(bytes_of[step][0])
        result.reduced_bytes.append(bytes_of[step][1])
        result.forward2_gathered_bytes.append(bytes_of.get(forwards, (-1, -1))[0])
        result.phases_s.append(phases)
        result.other_load.append(load)
        result.direction_s.append(float("nan") if first_order else timed(lambda: direction_pass(engine)))


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
    configuration = Configuration(args.model[0], args.dtype[0], args.method[0], args.mode[0])
    dtype, first_order = configuration.dtype, configuration.method == FIRST_ORDER
    torch.set_num_threads(args.threads)
    init_distributed()
    _, rank = get_world_size_and_rank()
    counter = CollectiveCounter()
    counter.install()
    timer = PhaseTimer()
    engine = build_first_order(args, configuration) if first_order else build_engine(args, configuration, timer)
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
    measure(engine, batch, args, timer, counter, result, first_order)
    result.peak_rss_mib = peak_rss_mib()
    result.peak_gpu_mib = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
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


def worker_command(args: argparse.Namespace, configuration: Configuration, result: Path) -> list[str]:
    """The command line of this rank's worker for one configuration."""
    return [
        sys.executable, os.path.abspath(__file__), "--worker", "--result", str(result),
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
    env = {**os.environ, "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(args.threads)}
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


def device_note() -> str:
    """What ran the benchmark: CPU + gloo, or the GPU model + NCCL."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} + NCCL (torch {torch.__version__})"
    return "CPU + gloo"


def gpu_memory_ratios(rows: list[Row]) -> list[str]:
    """On GPUs: each ZO configuration's peak GPU memory ÷ first-order AdamW's (target ≤ 0.35)."""
    first = {(r.configuration.model, r.configuration.dtype): max(r.peak_gpu_mib) for r in rows
             if r.configuration.method == FIRST_ORDER and any(r.peak_gpu_mib)}
    ratios = [f"{c.model} {c.dtype} {c.method} {c.mode} {max(r.peak_gpu_mib) / first[c.model, c.dtype]:.3f}×"
              for r in rows if (c := r.configuration).method != FIRST_ORDER and (c.model, c.dtype) in first]
    return ["", "Peak GPU memory, ZO ÷ first-order AdamW (target ≤ 0.35): " + ", ".join(ratios) + "."] if ratios else []


def memory_vs_mezo(rows: list[Row]) -> list[str]:
    """Each configuration's peak RSS above imports ÷ MeZO's (same model, dtype and mode), when MeZO ran."""
    mezo = {(r.configuration.model, r.configuration.dtype, r.configuration.mode): r.max_above_imports_mib
            for r in rows if r.configuration.method == "mezo"}
    ratios = [f"{c.method} {c.mode or ''} {r.max_above_imports_mib / mezo[c.model, c.dtype, c.mode]:.3f}×".replace("  ", " ")
              for r in rows if (c := r.configuration).method != "mezo" and (c.model, c.dtype, c.mode) in mezo]
    lines = ["", "Peak RSS above imports ÷ MeZO's (same model, dtype, mode): " + ", ".join(ratios) + "."] if ratios else []
    hizoo = [f"{r.ratio / 1.5:.3f}" for r in rows if r.configuration.method == "hizoo" and r.forward2_s == r.forward2_s]
    if hizoo:
        lines += ["", "HiZOO takes three forwards (ℓ0, ℓ+, ℓ−): its limit is 1.5× two forwards; step ÷ three forwards: "
                  + ", ".join(hizoo) + "."]
    return lines


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


def command_line(world_size: int, script: str = "bench/step_cost.py") -> str:
    """The launcher command that reproduces this run (the launcher's own ``--local_rank`` left out)."""
    options = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    return " ".join(["deepspeed", "--num_gpus", str(world_size), script, *options])


def method_label(configuration: Configuration) -> str:
    """'subzero', 'mezo' or 'first-order (AdamW)'."""
    return "first-order AdamW" if configuration.method == FIRST_ORDER else configuration.method


def models_note(rows: list[Row]) -> str:
    """One sentence per model: its shape and its parameter count."""
    seen: dict[str, int] = {}
    for r in rows:
        seen.setdefault(r.configuration.model, r.total_params)
    return " ".join(f"`{m}`: {MODELS[m].label}, {n / 1e6:.1f}M parameters." for m, n in seen.items())


def gather_ratios(rows: list[Row]) -> list[tuple[Configuration, float, float, float]]:
    """(fused configuration, in-place MiB, fused MiB, fused / in-place) for every pair run."""
    by_key = {(r.configuration.model, r.configuration.dtype, r.configuration.method, r.configuration.mode): r for r in rows}
    pairs = []
    for r in rows:
        c = r.configuration
        in_place = by_key.get((c.model, c.dtype, c.method, "in-place"))
        if c.mode == "fused" and in_place is not None and in_place.gathered_mib > 0:
            pairs.append((c, in_place.gathered_mib, r.gathered_mib, r.gathered_mib / in_place.gathered_mib))
    return pairs


def markdown_report(rows: list[Row], args: argparse.Namespace, world_size: int, wall_s: float) -> str:
    """The results as Markdown: the main table, communication, the phase breakdown and how they were measured."""
    verdicts = [
        f"{r.configuration.model} {r.configuration.dtype} {r.configuration.mode} {r.ratio:.3f}× "
        f"(target ≤ {TARGET_RATIO[r.configuration.mode]}: {'met' if r.ratio <= TARGET_RATIO[r.configuration.mode] else 'missed'})"
        for r in rows
        if r.configuration.method == "subzero" and not args.no_forwards
    ]
    lines = [
        "# ZO step cost vs. two plain forward passes",
        "",
        f"Command: `{command_line(world_size)}`",
        "",
        f"Tuning: {args.tuning}. Models (random weights): {models_note(rows)} ZeRO-3 over "
        f"{world_size} ranks, {device_note()}, {args.threads} torch thread(s) per rank, SDPA, no KV cache. "
        f"Batch {args.batch_size} × {args.seq_len} tokens per rank{batch_note(args.batch_size)}. "
        f"{args.warmup} warm-up + {args.steps} measured iterations; step and 2×forward interleaved, each timed "
        "after a barrier; per iteration the slower rank; median over iterations (min–max in brackets). "
        f"Wall time {wall_s / 60:.1f} min (rank 0, from its start to this report).",
        "",
        "| model | dtype | method | mode | step s | 2×forward s | ratio | all-gathered MiB per step | "
        "… per 2×forward | peak RSS MiB per rank | above imports MiB per rank "
        "| peak once built MiB per rank | peak GPU MiB per rank | other CPU load (repeats) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r.configuration
        lines.append(
            f"| {c.model} | {c.dtype} | {method_label(c)} | {c.mode or '—'} "
            f"| {r.step_s:.2f} [{r.step_spread[0]:.2f}–{r.step_spread[1]:.2f}] "
            f"| {r.forward2_s:.2f} [{r.forward2_spread[0]:.2f}–{r.forward2_spread[1]:.2f}] | **{r.ratio:.3f}** "
            f"| {r.gathered_mib:,.0f} | {r.forward2_gathered_mib:,.0f} "
            f"| {per_rank(r.peak_rss_mib)} | {per_rank(r.above_imports_mib)} | {per_rank(r.built_peak_rss_mib)} "
            f"| {per_rank(r.peak_gpu_mib) if any(r.peak_gpu_mib) else '—'} | {r.other_load:.0%} ({r.repeated}) |"
        )
    lines += [
        "",
        "Targets, SubZero step ÷ two plain forwards: "
        + (", ".join(verdicts) or "SubZero not run (or forwards not timed)") + ".",
        *memory_vs_mezo(rows),
        *gpu_memory_ratios(rows),
        "",
        "## Communication: bytes all-gathered per step",
        "",
        "| model | dtype | method | in-place MiB per step | fused MiB per step | fused ÷ in-place |",
        "|---|---|---|---|---|---|",
    ]
    for c, in_place, fused, ratio in gather_ratios(rows):
        verdict = "met" if ratio <= TARGET_GATHER_RATIO else "missed"
        lines.append(f"| {c.model} | {c.dtype} | {c.method} | {in_place:,.0f} | {fused:,.0f} "
                     f"| **{ratio:.3f}** ({verdict}) |")
    lines += [
        "",
        f"Target: fused ≤ {TARGET_GATHER_RATIO}× in-place. Counted per rank by wrapping the all-gathers of "
        "DeepSpeed's communication backend and of `torch.distributed` in the worker while a step (or a forward "
        "pair) runs; an all-gather counts its whole output tensor (the full parameter that lands on the rank), so "
        "a rank receives (world − 1)/world of it over the wire. The largest value over ranks and measured steps. "
        "ZeRO-3 keeps parameters below its persistence threshold gathered, so they do not show up.",
        "",
        "Peak RSS (`ru_maxrss`) covers the whole life of a fresh worker process per configuration: imports, "
        "model creation (partitioned at construction), engine initialization, warm-up and every measured "
        "step and forward pair. 'Above imports' subtracts the RSS right after the imports "
        f"({per_rank(rows[0].rss_after_imports_mib)} MiB for the first configuration); 'peak once built' is the "
        "peak reached by the end of engine initialization, before any forward pass. 'Other CPU load' is the "
        "largest share of the host's CPU time used by processes other than the benchmark's workers during a "
        f"measured iteration; an iteration above {args.max_other_load:.0%} was measured again (repeats in "
        "brackets, at most `--max-repeats`). If it is still more than a few percent, something else competed "
        "for the cores and the timings are suspect: run again on a quiet machine.",
        "",
        "## Where the step time goes (rank 0, median seconds per step)",
        "",
        "| model | dtype | method | mode | step | " + " | ".join(BREAKDOWN) + " | direction generation, one pass |",
        "|---|---|---|---|---|" + "---|" * (len(BREAKDOWN) + 1),
    ]
    for r in rows:
        c = r.configuration
        if c.method == FIRST_ORDER:
            continue
        phases = " | ".join(f"{r.phases_s[name]:.3f}" for name in BREAKDOWN)
        lines.append(f"| {c.model} | {c.dtype} | {c.method} | {c.mode} | {r.rank0_step_s:.2f} | {phases} "
                     f"| {r.direction_s:.3f} |")
    lines += [
        "",
        "'forward ×2' are the loss forwards inside the step (in fused mode: the one forward over the doubled "
        "batch [B; B], with its side paths); 'backup copy', 'perturb ×2' (in-place mode only) and 'update' each "
        "regenerate the direction and write the shard; 'cache release' is `empty_partition_cache` (called after "
        "each write); 'other' is the rest of rank 0's step, mostly the loss all-reduce, which waits for the slower "
        "rank. 'Direction generation, one pass' times generating this rank's slice of D_t alone, once, without "
        "writing it.",
    ]
    return "\n".join(lines) + "\n"


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


def write_json(rows: list[Row], path: Path) -> None:
    """The rows, machine-readable, next to the Markdown report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in rows], indent=1))


def run_launched(args: argparse.Namespace) -> None:
    """Run every configuration, then rank 0 prints the report and writes it to ``--output``."""
    init_distributed()
    rows = run_all(args)
    if dist.get_rank() == 0:
        publish(markdown_report(rows, args, dist.get_world_size(), wall_seconds()), args.output, "step_cost")


def wall_seconds() -> float:
    """Seconds since this process started."""
    return time.time() - psutil.Process().create_time()


def publish(report: str, output: Path, name: str) -> None:
    """Write a benchmark's markdown report to ``output`` and print it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    print(report, flush=True)
    log(f"{name}: report written to {output}")


def exit_cleanly(status: int) -> None:
    """Barrier, tear the process group down, remove DeepSpeed's /dev/shm buffer, and leave at once.

    A 2-rank ZeRO-3 process sometimes aborts at interpreter exit ("terminate called without an
    active exception"); :func:`subzero_ds.distributed.exit_process` exits right after
    ``destroy_process_group`` and unlinks the 66 MB all-reduce buffer DeepSpeed's CPU comm op
    leaves in /dev/shm for every process (one per worker here).
    """
    exit_process(status)


def show_progress() -> None:
    """Print subzero_ds's INFO lines (the benchmarks' progress) with timestamps."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger("subzero_ds").addHandler(handler)
    logging.getLogger("subzero_ds").setLevel(logging.INFO)


def run_or_exit(run: Callable[[], T]) -> T:
    """``run()``; a RuntimeError (a failed worker) is logged on every rank and ends the process with status 1."""
    try:
        return run()
    except RuntimeError as error:
        log(str(error), all_ranks=True)
        exit_cleanly(1)


def main() -> None:
    """Entry point of the launched process and of the workers it starts."""
    args = parse_args()
    show_progress()
    if args.worker:
        run_worker(args)  # never returns: ends the worker process
    run_or_exit(lambda: run_launched(args))
    exit_cleanly(0)


if __name__ == "__main__":
    main()
