"""The run behind subzero-train: named setup steps, then the training loop.

    train(args):  engine_config → setup_data → setup_model + build_engine → setup_batches → setup_resume
                  → setup_metrics → warn_if_disk_short → zero-shot evaluation → fit (the loop) → final evaluation
                  → save_final

ZO runs catch SIGTERM/SIGUSR1 throughout: after every step the ranks agree whether one arrived, and if so
they write a checkpoint and stop together (``Preempted``; subzero_ds.faults).

Every rank runs it. The engine is a :class:`~.engines.TrainingEngine`, ZO or first-order: the loop
does not know which.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn
from tqdm import tqdm

from subzero_ds.adapters import add_adapter, is_peft_model, merge_adapter
from subzero_ds.checkpoint.sharded import CheckpointError, checkpoint_dir, checkpoint_space_warning, latest_checkpoint
from subzero_ds.distributed import get_world_size_and_rank, init_distributed, is_main_process, log
from subzero_ds.faults import Activity, Preempted, PreemptionSignals, stop_on_collective_timeout
from subzero_ds.loss import LossFn, language_model_loss
from subzero_ds.tasks import DataError, Sample, Task, TaskKind
from subzero_ds.tasks.encoding import SampleEncoder, candidate_batch, check_examples, classification_loss, lm_batch
from subzero_ds.tasks.evaluation import evaluate_task

from . import models
from .args import Args
from .batches import RankBatches, load_data
from .engines import EngineConfig, TrainingEngine, build_engine, engine_config
from .metrics import MetricsLog, Throughput, TrainingTime, peak_memory, print_summary


@dataclass(frozen=True)
class Data:
    """The task and its examples (dev is held out of train)."""

    task: Task
    train: list[Sample]
    dev: list[Sample]
    eval: list[Sample]


@dataclass(frozen=True)
class Model:
    """The loaded model (with its adapter), where it came from, and how it reads the task's examples."""

    module: nn.Module
    path: str  # the resolved directory (or hub id)
    masked_lm: bool
    tokenizer: Any
    encoder: SampleEncoder
    make_batch: Callable[[list[Sample], SampleEncoder], dict[str, Any]]
    loss_fn: LossFn


def train(args: Args) -> dict[str, Any]:
    """Train as ``args`` (validated) say; write metrics.jsonl, final/ and eval_results.json; return the results.

    Raises:
        Preempted: SIGTERM/SIGUSR1 reached a rank (ZO runs); every rank stopped after the same step with a checkpoint.
        CollectiveTimeoutError: another rank did not answer a collective within the collective timeout.
    """
    config = engine_config(args.train)  # fails before any loading
    timeout = args.train.collective_timeout or config.collective_timeout
    activity = Activity()
    # ZO runs catch stop signals from the start: one during the set-up also ends in a checkpoint. A first-order
    # baseline writes none, so a signal ends it as it ends any process.
    signals = contextlib.nullcontext() if args.train.first_order else PreemptionSignals()
    last_checkpoint = lambda: latest_checkpoint(args.output.checkpoints_dir)  # noqa: E731
    with signals as stop_signals, stop_on_collective_timeout(activity, timeout, last_checkpoint,
                                                             "run the same command with --resume"):
        return _train(args, config, timeout, stop_signals, activity)


def _train(args: Args, config: EngineConfig, timeout: float, stop_signals: PreemptionSignals | None,
           activity: Activity) -> dict[str, Any]:
    init_distributed(timeout=timeout)
    data = setup_data(args)
    per_device = args.train.per_device_batch_size or int(config.ds_config.get("train_micro_batch_size_per_gpu", 8))
    with models.partitioned_loading(config.ds_config, config.settings.stage, args.train.per_device_batch_size):
        model = setup_model(args, data, config)
        engine = build_engine(args.train, config, model.module, model.loss_fn, per_device)
    batches = setup_batches(args, data, model, engine, per_device)
    resumed = setup_resume(args, engine, batches.state)
    metrics = setup_metrics(args, engine, resumed)
    warn_if_disk_short(args, engine)
    world_size = get_world_size_and_rank()[0]

    def evaluate(samples: list[Sample], step: int) -> dict[str, float]:
        scores = evaluate_task(engine.module, data.task, samples, model.encoder, args.eval.eval_batch_size,
                               args.eval.max_new_tokens, device=engine.device)
        metrics.write({"step": step, **{f"eval_{k}": v for k, v in scores.items()}})
        return scores

    log(f"task {data.task.name}: {len(data.train)} train, {len(data.dev)} dev, {len(data.eval)} eval examples; "
        f"{batches.world_size} rank(s) x {engine.accumulation_steps} micro-batch(es) x {per_device} per step"
        + (f" (each of the {world_size // batches.world_size} replica groups the same batch)"
           if batches.world_size != world_size else ""))
    if resumed is None:
        activity.now = "the zero-shot evaluation"
        zero_shot = evaluate(data.eval, 0)
        log(f"zero-shot {data.task.metric}: {zero_shot[data.task.metric]:.4f}")
    else:
        zero_shot = resumed["zero_shot"]
    checkpoint_state = {**batches.state, "zero_shot": zero_shot, "model_name_or_path": model.path,
                        "tuning": args.adapter.tuning.value, "adapter": asdict(args.adapter.options(args.data.seed)),
                        "masked_lm": model.masked_lm}
    first_step = engine.global_step + 1
    clock = TrainingTime(before=resumed.get("train_seconds") if resumed is not None else 0.0)

    def save_checkpoint() -> Path:
        return engine.save_checkpoint(args.output.checkpoints_dir, keep_last=args.train.save_total_limit,
                                      extra={**checkpoint_state, "train_seconds": clock.total()})

    last_step = fit(args, engine, batches, metrics, clock, save_checkpoint,
                    evaluate_dev=lambda step: evaluate(data.dev or data.eval, step), stop_signals=stop_signals,
                    activity=activity)
    trained_steps = max(1, last_step - first_step + 1)  # in this run
    train_seconds, estimated = clock.whole_run(last_step, trained_steps)

    activity.now = "the final evaluation"
    final = evaluate(data.eval, last_step)
    activity.now = "writing the final model"
    save_final(args, engine, model)
    results = {"task": data.task.name, "model": args.model.model_name_or_path, "world_size": world_size,
               "optimizer": engine.description, "steps": last_step, "num_eval": len(data.eval), "zero_shot": zero_shot,
               "final": final, "train_seconds": train_seconds, "trained_steps": trained_steps,
               "resumed_at_step": first_step - 1, **({"train_seconds_estimated": True} if estimated else {}),
               **peak_memory(engine.device)}
    if is_main_process():
        (args.output.output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
    print_summary(results, data.task.metric)
    return results


def fit(args: Args, engine: TrainingEngine, batches: RankBatches, metrics: MetricsLog, clock: TrainingTime,
        save_checkpoint: Callable[[], Path], evaluate_dev: Callable[[int], Any],
        stop_signals: PreemptionSignals | None = None, activity: Activity | None = None) -> int:
    """The training loop, from the engine's next step to --max_steps or the time budget. Returns the last step.

    ``activity.now`` says what the loop is doing (for a fault's message); ``stop_signals``: see below.

    Raises:
        Preempted: a rank received a stop signal; every rank stopped after the same step, with its checkpoint.
    """
    log_steps, eval_steps, save_steps = args.output.log_steps, args.eval.eval_steps, args.train.save_steps
    first_step, last_step = engine.global_step + 1, args.train.max_steps  # unless the time budget ends it earlier
    progress = tqdm(total=args.train.max_steps, initial=first_step - 1, desc=f"{engine.description} steps",
                    disable=not is_main_process(), dynamic_ncols=True)
    throughput = Throughput(engine.forwards_per_micro_batch, get_world_size_and_rank()[0])
    activity = activity or Activity()

    def stop_if_signalled(step: int, saved: bool) -> None:
        """Every rank agrees (one all-reduce) whether any got a stop signal; if so: the checkpoint, then stop."""
        signal_name = stop_signals.agreed() if stop_signals is not None else None
        if signal_name is None:
            return
        activity.now = f"writing checkpoint-{step} on {signal_name}"
        checkpoint = checkpoint_dir(args.output.checkpoints_dir, step) if saved else save_checkpoint()
        raise Preempted(signal_name, step, checkpoint)

    try:
        stop_if_signalled(first_step - 1, saved=False)  # a signal during the setup
        for step in range(first_step, args.train.max_steps + 1):
            activity.now = f"step {step}"
            for batch in batches.of_step(step):
                row = engine.step(batch)
                throughput.count(batch)
            progress.update(1)
            out_of_time = clock.out_of(args.train.max_train_seconds)  # every rank stops together
            if out_of_time:
                last_step = step
            if step % log_steps == 0 or step == last_step:
                row = {"step": step, **row, **throughput.row(steps=(step - 1) % log_steps + 1)}
                metrics.write(row)
                progress.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
            if eval_steps and step % eval_steps == 0 and step != last_step:
                activity.now = f"the dev evaluation after step {step}"
                evaluate_dev(step)
            saved = bool(save_steps) and step % save_steps == 0
            if saved:
                activity.now = f"writing checkpoint-{step}"
                save_checkpoint()
            activity.now = f"the check for stop signals after step {step}"
            stop_if_signalled(step, saved)
            if out_of_time:
                log(f"--max_train_seconds {args.train.max_train_seconds:g} reached after step {step}")
                break
    finally:
        progress.close()  # also when a fault stops the loop: its message then starts on a line of its own
    return last_step


def setup_data(args: Args) -> Data:
    """The task and its train, dev and eval examples (seeded samples of the files)."""
    task = args.data.make_task()
    return Data(task, *load_data(args.data, task))


def setup_model(args: Args, data: Data, config: EngineConfig) -> Model:
    """The model's directory and kind, its tokenizer and loss; every example checked; then the weights and adapter.

    Raises:
        DataError: an example the model cannot read (too long, say), or a task the model cannot do.
    """
    path = models.resolve_model_path(args.model.model_name_or_path)
    masked_lm = models.is_masked_lm(path, args.model.model_type)
    if masked_lm and data.task.kind is TaskKind.GENERATION:
        raise DataError(f"task {data.task.name!r} needs generation, which a masked LM cannot do: use a causal LM")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model.tokenizer or path)
    encoder = SampleEncoder(tokenizer, args.data.max_length, masked_lm=masked_lm, truncate=not args.data.no_truncation)
    classify = masked_lm or args.train.train_as_classification
    if classify and data.task.kind is TaskKind.GENERATION:
        raise DataError(f"--train_as_classification needs candidates; task {data.task.name!r} is generation")
    # Language-model training: the package's one LM loss, scored inside the LM head (never the whole logits).
    make_batch, loss_fn = (candidate_batch, classification_loss) if classify else (lm_batch, language_model_loss)
    for split, samples in (("training", data.train), ("dev", data.dev), ("evaluation", data.eval)):
        check_examples(samples, encoder, split, generate=split == "evaluation")  # before the model loads
    module = models.load_model(path, masked_lm, config.settings.precision.dtype)
    module = add_adapter(module, args.adapter.tuning, args.adapter.options(args.data.seed), masked_lm=masked_lm)
    return Model(module, path, masked_lm, tokenizer, encoder, make_batch, loss_fn)


def setup_batches(args: Args, data: Data, model: Model, engine: TrainingEngine, per_device: int) -> RankBatches:
    """This rank's encoded micro-batches of each step, once every rank is known to read the same data."""
    share, shares = engine.batch_share  # a replica group shares one batch in perturbation mode
    batches = RankBatches(data.train, args.data.seed, per_device, engine.accumulation_steps, shares, share,
                          lambda samples: model.make_batch(samples, model.encoder))
    batches.check_ranks_agree()
    return batches


def setup_resume(args: Args, engine: TrainingEngine, data_state: dict[str, Any]) -> dict[str, Any] | None:
    """With --resume: the checkpoint loaded into ``engine``, and the state saved with it; else None."""
    if not args.train.resume:
        return None
    return resume(engine, args.train.resume, args.output.checkpoints_dir, data_state)


def resume(engine: TrainingEngine, checkpoint: str, root: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Load ``checkpoint`` ("auto": the newest under ``root``) and check it continues this run's data.

    Raises:
        CheckpointError: no checkpoint, a broken or incompatible one, or one written for other training data.
    """
    path = root if checkpoint == "auto" else Path(checkpoint)
    if checkpoint == "auto" and latest_checkpoint(root) is None:
        raise CheckpointError(f"--resume found no complete checkpoint in {root}: train with --save_steps N first, "
                              "or pass the checkpoint directory (--resume PATH)")
    saved = engine.load_checkpoint(path)
    changed = [k for k in data if saved.get(k) != data[k]]
    if changed:
        raise CheckpointError(
            f"the checkpoint was written for other training data ({', '.join(changed)} differ): the resumed run would "
            "not see the batches the interrupted one would have. Resume with the same data files, --seed, "
            "--num_train/--num_dev, --per_device_batch_size and number of ranks × batch."
        )
    return saved


def setup_metrics(args: Args, engine: TrainingEngine, resumed: dict[str, Any] | None) -> MetricsLog:
    """--output_dir (made now) and its metrics.jsonl; a resumed run keeps the rows up to its checkpoint."""
    args.output.output_dir.mkdir(parents=True, exist_ok=True)
    return MetricsLog(args.output.output_dir / "metrics.jsonl", engine.monitor,
                      after_step=engine.global_step if resumed is not None else None)


def warn_if_disk_short(args: Args, engine: TrainingEngine) -> None:
    """Warn at start when --output_dir cannot hold --save_total_limit + 1 checkpoints and the final model."""
    checkpoint = engine.checkpoint_bytes() if args.train.save_steps else 0  # collective: before the rank-0 test
    final = models.saved_model_bytes(engine.module, merged=args.adapter.merge_adapter)
    warning = checkpoint_space_warning(args.output.output_dir, checkpoint, args.train.save_total_limit, final)
    if warning is not None:
        log(f"warning: {warning}")


def save_final(args: Args, engine: TrainingEngine, model: Model) -> None:
    """final/: the model (or its adapter) and the tokenizer; with --merge_adapter also final/merged/."""
    final = args.output.output_dir / "final"
    engine.save_model(final)
    if args.adapter.merge_adapter and is_peft_model(engine.module):
        merge_adapter(model.path, final, final / "merged")
        if is_main_process():
            model.tokenizer.save_pretrained(final / "merged")
    if is_main_process():
        model.tokenizer.save_pretrained(final)
