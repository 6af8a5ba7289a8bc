"""The worker of a step measurement: one configuration on this rank, in a fresh process.

Run by the launched ranks (:func:`harness.steps.run_configuration`) as
``python -m harness.step_worker --result <path> …`` with the options of :func:`harness.steps.parse_args`.
It builds the model (random weights, partitioned by ZeRO-3 as it is created) and the engine, then
alternates steps and two plain forward passes, counting the bytes collectives move during each,
recording the step's phases and watching the host's CPU load, and writes a :class:`WorkerResult`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import psutil
import torch

import subzero_ds
import subzero_ds.phases
from subzero_ds.adapters import Tuning, add_adapter
from subzero_ds.config.subzero import drop_other_methods_keys
from subzero_ds.distributed import get_world_size_and_rank, init_distributed, log
from subzero_ds.loss import forward_loss, model_loss
from subzero_ds.methods.sparse_mezo import SparseDirection

from .collectives import CollectiveCounter
from .load import CpuUsage, other_load
from .models import DTYPES, MODELS, Batch, build_partitioned, random_batch
from .steps import FIRST_ORDER, NESTED_PHASES, PHASES, ZO_METHODS, Configuration, parse_args
from .workers import exit_cleanly, peak_rss_mib, show_progress, timed

RSS_AFTER_IMPORTS_MIB = psutil.Process().memory_info().rss / 2**20


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
    shape = MODELS[configuration.model]
    model = build_partitioned(shape.model_class, shape.config(), config, DTYPES[configuration.dtype])
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


def main() -> None:
    """Measure the one configuration of the command line on this rank (the process ends here)."""
    args = parse_args()
    show_progress()
    run_worker(args)


if __name__ == "__main__":
    main()
