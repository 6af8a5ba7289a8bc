"""subzero-train, the training front end: fine-tune a Hugging Face model on a task, ZO or first-order.

    python -m subzero_ds.train --help    # also: deepspeed --module subzero_ds.train ..., subzero-train ...

args.py         the arguments: typed groups whose fields are the flags (flags.py makes the parser)
recipe.py       train(args): the named setup steps, then the training loop (fit)
engines.py      what the loop needs from an engine (TrainingEngine), the ZO engine, the choice of engine
first_order.py  the first-order baseline engine (DeepSpeed's optimizer)
batches.py      the examples, the seeded global batch of each step and each rank's share of it
models.py       the model's directory (pretrained.py: the built-in SmolLM2), kind, loading and saving
metrics.py      metrics.jsonl, throughput, training time, peak memory, the summary table
__main__.py     main(): validate, train, exit codes
"""

from typing import Any

from .args import DEFAULT_CONFIG, AdapterArgs, Args, DataArgs, EvalArgs, ModelArgs, OutputArgs, TrainArgs, parse_args
from .batches import RankBatches, TaskBatches, data_fingerprint, load_data
from .engines import TrainingEngine, ZOEngine, build_engine, engine_config
from .first_order import OPTIMIZER_TYPES, FirstOrderEngine, first_order_config
from .flags import UsageError
from .metrics import MetricsLog, peak_memory
from .models import MASKED_LM_TYPES, is_masked_lm, load_model, resolve_model_path, save_model
from .recipe import resume, train

__all__ = ["main", "Args", "ModelArgs", "DataArgs", "TrainArgs", "EvalArgs", "AdapterArgs", "OutputArgs",
           "DEFAULT_CONFIG", "UsageError", "parse_args", "train", "resume", "TrainingEngine", "ZOEngine",
           "FirstOrderEngine", "build_engine", "engine_config", "first_order_config", "OPTIMIZER_TYPES",
           "TaskBatches", "RankBatches", "data_fingerprint", "load_data", "MetricsLog", "peak_memory",
           "MASKED_LM_TYPES", "is_masked_lm", "load_model", "resolve_model_path", "save_model"]


def __getattr__(name: str) -> Any:
    # main lives in __main__.py, imported on first use: `python -m subzero_ds.train` runs that file as
    # the script, and would warn if importing the package had already imported it as a module.
    if name == "main":
        from .__main__ import main

        return main
    raise AttributeError(f"module 'subzero_ds.train' has no attribute {name!r}")
