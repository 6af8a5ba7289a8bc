"""The training run of subzero-train: load the data and the model, build the engine, train, evaluate, save."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

import subzero_ds
from subzero_ds.adapters import add_adapter, is_peft_model, merge_adapter
from subzero_ds.checkpoint.sharded import CheckpointError, latest_checkpoint
from subzero_ds.config import deepspeed_section, load_ds_config, parse
from subzero_ds.config.deepspeed import parse_deepspeed
from subzero_ds.config.errors import raise_problems
from subzero_ds.loss import language_model_loss
from subzero_ds.tasks.encoding import SampleEncoder, candidate_batch, check_examples, classification_loss, lm_batch
from subzero_ds.distributed import (disagreements, get_world_size_and_rank, init_distributed, is_main_process, log,
                                    sum_over_ranks)
from subzero_ds.tasks.evaluation import evaluate_task
from subzero_ds.tasks import DataError, Sample, TaskKind

from . import models
from .args import Args
from .batches import TaskBatches, data_fingerprint, load_data
from .first_order import FirstOrderEngine, first_order_config
from .metrics import MetricsLog, metrics_of, peak_memory, print_summary
from .models import is_masked_lm, resolve_model_path, save_model


def train(args: Args) -> dict[str, Any]:
    """Train as ``args`` (validated) say; write metrics.jsonl, final/ and eval_results.json; return the results."""
    config_source = args.train.config_source
    ds_config = load_ds_config(config_source)
    first_order = args.train.first_order
    source = args.train.config_name
    if first_order:
        ds_config = first_order_config(ds_config, args.train.optimizer, args.train.learning_rate, 0.0)
        deepspeed_settings, problems = parse_deepspeed(ds_config, zeroth_order=False)
        raise_problems(problems, source)
    else:  # fail before any loading
        deepspeed_settings = parse(ds_config, source)[1]
    task = args.data.make_task()

    init_distributed()
    world_size, rank = get_world_size_and_rank()
    train_samples, dev_samples, eval_samples = load_data(args.data, task)
    model_path = resolve_model_path(args.model.model_name_or_path)
    masked_lm = is_masked_lm(model_path, args.model.model_type)
    if masked_lm and task.kind is TaskKind.GENERATION:
        raise DataError(f"task {task.name!r} needs generation, which a masked LM cannot do: use a causal LM")
    from transformers import AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    tokenizer = AutoTokenizer.from_pretrained(args.model.tokenizer or model_path)
    encoder = SampleEncoder(tokenizer, args.data.max_length, masked_lm=masked_lm,
                            truncate=not args.data.no_truncation)
    classify = masked_lm or args.train.train_as_classification
    if classify and task.kind is TaskKind.GENERATION:
        raise DataError(f"--train_as_classification needs candidates; task {task.name!r} is generation")
    # Language-model training: the package's one LM loss, scored inside the LM head (never the whole logits).
    make_batch, loss_fn = (candidate_batch, classification_loss) if classify else (lm_batch, language_model_loss)
    for split, samples in (("training", train_samples), ("dev", dev_samples), ("evaluation", eval_samples)):
        check_examples(samples, encoder, split, generate=split == "evaluation")  # before the model loads

    # Alive while the model is built: transformers and peft consult it to partition at load time and
    # to gather partitioned weights they read (prompt tuning's init). Dropped after initialize, so
    # rank-0-only work later (merging the adapter on CPU) does not start collectives.
    section = deepspeed_section(ds_config)
    if "train_batch_size" not in section:  # DeepSpeed's config parser insists on a batch size
        section.setdefault("train_micro_batch_size_per_gpu", args.train.per_device_batch_size or 1)
    hf_zero3 = HfDeepSpeedConfig(section) if deepspeed_settings.stage == 3 else None
    model = models.load_model(model_path, masked_lm, deepspeed_settings.precision.dtype)
    options = args.adapter.options(args.data.seed)
    model = add_adapter(model, args.adapter.tuning, options, masked_lm=masked_lm)
    per_device = args.train.per_device_batch_size or int(ds_config.get("train_micro_batch_size_per_gpu", 8))
    if first_order:
        engine = FirstOrderEngine(model, {**ds_config, "train_micro_batch_size_per_gpu": per_device}, loss_fn)
    else:
        engine = subzero_ds.initialize(model=model, config=config_source, loss_fn=loss_fn)
    del hf_zero3
    micro_batches = engine.accumulation_steps
    global_batch = per_device * micro_batches * world_size
    batches = TaskBatches(train_samples, global_batch, args.data.seed)
    data = {"data_fingerprint": data_fingerprint(train_samples), "data_seed": args.data.seed,
            "global_batch": global_batch}
    differing = disagreements({"training data": data["data_fingerprint"]})
    if differing:
        raise DataError("ranks disagree on the training data (different files or --seed/--num_train per rank): "
                        "every rank must read the same data, or the run is silently wrong. Pass the same arguments.")
    checkpoints = args.output.output_dir / "checkpoints"
    resumed = resume(engine, args.train.resume, checkpoints, data) if args.train.resume else None
    args.output.output_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(args.output.output_dir / "metrics.jsonl", engine.ds_engine.monitor,
                         after_step=engine.global_step if resumed is not None else None)

    def evaluate(samples: list[Sample]) -> dict[str, float]:
        return evaluate_task(engine.module, task, samples, encoder, args.eval.eval_batch_size,
                             args.eval.max_new_tokens, device=engine.device)

    log(f"task {task.name}: {len(train_samples)} train, {len(dev_samples)} dev, {len(eval_samples)} eval examples; "
        f"{world_size} rank(s) x {micro_batches} micro-batch(es) x {per_device} per step")
    if resumed is None:
        zero_shot = evaluate(eval_samples)
        metrics.write({"step": 0, **{f"eval_{k}": v for k, v in zero_shot.items()}})
        log(f"zero-shot {task.metric}: {zero_shot[task.metric]:.4f}")
    else:
        zero_shot = resumed["zero_shot"]
    first_step = engine.global_step + 1
    saved_state = {**data, "zero_shot": zero_shot, "model_name_or_path": model_path,
                   "tuning": args.adapter.tuning.value, "adapter": asdict(options), "masked_lm": masked_lm}

    kind = f"first-order ({args.train.optimizer})" if first_order else "ZO"
    progress = tqdm(total=args.train.max_steps, initial=first_step - 1, desc=f"{kind} steps", disable=rank != 0,
                    dynamic_ncols=True)
    # Forward passes per micro-batch and step: the method's probes (a first-order step: 1 forward + its backward).
    forwards = 1 if first_order else len(engine.method.estimator.probes())
    started = time.perf_counter()
    # Training seconds before this run, so a resumed run reports its whole cost; a checkpoint from before
    # the field existed has None, and the total is then estimated from this run's rate (and says so).
    seconds_before = resumed.get("train_seconds") if resumed is not None else 0.0
    window_start, window_tokens = started, 0
    last_step = args.train.max_steps
    for step in range(first_step, args.train.max_steps + 1):
        step_samples = batches.at(step - 1)
        for micro in range(micro_batches):  # micro-batch `micro` of rank r: a fixed share of the global batch
            first = (micro * world_size + rank) * per_device
            batch = make_batch(step_samples[first : first + per_device], encoder)
            result = engine.step(batch)
            window_tokens += forwards * int(batch["attention_mask"].sum()) * world_size  # ranks see equal shares
        progress.update(1)
        out_of_time = args.train.max_train_seconds > 0 and sum_over_ranks(
            float(time.perf_counter() - started >= args.train.max_train_seconds))[0] > 0  # every rank stops together
        if out_of_time:
            last_step = step
        if step % args.output.log_steps == 0 or step == last_step:
            now = time.perf_counter()
            seconds = (now - window_start) / ((step - 1) % args.output.log_steps + 1)
            row = {"step": step, **metrics_of(result), "seconds_per_step": seconds,
                   "tokens_per_second": window_tokens / (now - window_start)}
            metrics.write(row)
            progress.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
            window_start, window_tokens = now, 0
        if args.eval.eval_steps and step % args.eval.eval_steps == 0 and step != last_step:
            scores = evaluate(dev_samples or eval_samples)
            metrics.write({"step": step, **{f"eval_{k}": v for k, v in scores.items()}})
        if args.train.save_steps and step % args.train.save_steps == 0:
            elapsed = None if seconds_before is None else seconds_before + time.perf_counter() - started
            engine.save_checkpoint(checkpoints, extra={**saved_state, "train_seconds": elapsed},
                                   keep_last=args.train.save_total_limit)
        if out_of_time:
            log(f"--max_train_seconds {args.train.max_train_seconds:g} reached after step {step}")
            break
    progress.close()
    trained_steps = max(1, last_step - first_step + 1)  # in this run
    run_seconds = time.perf_counter() - started
    estimated = seconds_before is None
    train_seconds = run_seconds * last_step / trained_steps if estimated else seconds_before + run_seconds

    final = evaluate(eval_samples)
    metrics.write({"step": last_step, **{f"eval_{k}": v for k, v in final.items()}})
    save_model(engine, args.output.output_dir / "final")
    if args.adapter.merge_adapter and is_peft_model(engine.module):
        final_dir = args.output.output_dir / "final"
        merge_adapter(model_path, final_dir, final_dir / "merged")
        if is_main_process():
            tokenizer.save_pretrained(args.output.output_dir / "final" / "merged")
    results = {"task": task.name, "model": args.model.model_name_or_path, "world_size": world_size, "optimizer": kind,
               "steps": last_step, "num_eval": len(eval_samples), "zero_shot": zero_shot, "final": final,
               "train_seconds": train_seconds, "trained_steps": trained_steps, "resumed_at_step": first_step - 1,
               **({"train_seconds_estimated": True} if estimated else {}), **peak_memory(engine.device)}
    if is_main_process():
        tokenizer.save_pretrained(args.output.output_dir / "final")
        (args.output.output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
    print_summary(results, task.metric)
    return results



def resume(engine, checkpoint: str, root: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Load ``checkpoint`` ("auto": the newest under ``root``) and check it continues this run's data."""
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
