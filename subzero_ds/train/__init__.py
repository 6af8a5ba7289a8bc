"""subzero-train, the training front end: fine-tune a Hugging Face model on a task, ZO or first-order.

    python -m subzero_ds.train --help        # or: deepspeed --module subzero_ds.train ..., subzero-train ...

args.py       the flags and the checks they get before anything is loaded
recipe.py     the run: data, model, engine, resume, metrics, the training loop, the final evaluation
first_order.py  the first-order baseline engine (DeepSpeed's optimizer)
batches.py    the seeded global batch of each step and the data fingerprint
models.py     the model's directory (pretrained.py: the built-in SmolLM2), kind, loading and saving
metrics.py    metrics.jsonl, peak memory, the summary table
__main__.py   main(): validate, train, exit codes
"""

from typing import Any

from .args import DEFAULT_CONFIG, UsageError, parse_args, validate_args
from .batches import TaskBatches, data_fingerprint, load_data
from .first_order import OPTIMIZER_TYPES, FirstOrderEngine, FirstOrderResult, first_order_config
from .metrics import MetricsLog, metrics_of, peak_memory
from .models import MASKED_LM_TYPES, is_masked_lm, load_model, resolve_model_path, save_model
from .recipe import resume, train

__all__ = ["main", "DEFAULT_CONFIG", "UsageError", "parse_args", "validate_args", "TaskBatches", "data_fingerprint",
           "load_data", "OPTIMIZER_TYPES", "FirstOrderEngine", "FirstOrderResult", "first_order_config", "MetricsLog",
           "metrics_of", "peak_memory", "MASKED_LM_TYPES", "is_masked_lm", "load_model", "resolve_model_path",
           "save_model", "resume", "train"]


def __getattr__(name: str) -> Any:
    # main lives in __main__.py; imported on first use, so `python -m subzero_ds.train` (which runs
    # __main__.py as the script) does not find it already imported as a module and warn.
    if name == "main":
        from .__main__ import main

        return main
    raise AttributeError(f"module 'subzero_ds.train' has no attribute {name!r}")
