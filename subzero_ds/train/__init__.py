"""subzero-train, the training front end: fine-tune a Hugging Face model on a task, ZO or first-order.

    python -m subzero_ds.train --help    # also: deepspeed --module subzero_ds.train ..., subzero-train ...

args.py         the arguments: typed groups whose fields are the flags (flags.py makes the parser)
recipe.py       train(args): load the data and the model, build the engine, train, evaluate, save
first_order.py  the first-order baseline engine (DeepSpeed's optimizer)
batches.py      the examples, the seeded global batch of each step and the data fingerprint
models.py       the model's directory (pretrained.py: the built-in SmolLM2), kind, loading and saving
metrics.py      metrics.jsonl, peak memory, the summary table
__main__.py     main(): validate, train, exit codes
"""

from typing import Any

from .args import DEFAULT_CONFIG, AdapterArgs, Args, DataArgs, EvalArgs, ModelArgs, OutputArgs, TrainArgs, parse_args
from .batches import TaskBatches, data_fingerprint, load_data
from .first_order import OPTIMIZER_TYPES, FirstOrderEngine, FirstOrderResult, first_order_config
from .flags import UsageError
from .metrics import MetricsLog, metrics_of, peak_memory
from .models import MASKED_LM_TYPES, is_masked_lm, load_model, resolve_model_path, save_model
from .recipe import resume, train

__all__ = ["main", "Args", "ModelArgs", "DataArgs", "TrainArgs", "EvalArgs", "AdapterArgs", "OutputArgs",
           "DEFAULT_CONFIG", "UsageError", "parse_args", "train", "resume", "FirstOrderEngine", "FirstOrderResult",
           "first_order_config", "OPTIMIZER_TYPES", "TaskBatches", "data_fingerprint", "load_data", "MetricsLog",
           "metrics_of", "peak_memory",
           "MASKED_LM_TYPES", "is_masked_lm", "load_model", "resolve_model_path", "save_model"]


def __getattr__(name: str) -> Any:
    # main lives in __main__.py, imported on first use: `python -m subzero_ds.train` runs that file as
    # the script, and would warn if importing the package had already imported it as a module.
    if name == "main":
        from .__main__ import main

        return main
    raise AttributeError(f"module 'subzero_ds.train' has no attribute {name!r}")
