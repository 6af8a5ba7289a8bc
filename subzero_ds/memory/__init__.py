"""Memory planner: per-rank bytes on GPU, CPU and NVMe of a ZO run under ZeRO-3, before launching it.

    subzero-memory --model opt-13b --config ds_configs/zero3_subzero_bf16.json \\
        --nodes 2 --gpus-per-node 8 --gpu-memory-gib 80 --cpu-memory-gib 1024 --batch-size 4 --seq-len 512
    subzero-memory --table            # the published prediction table (BENCHMARKS.md)
    subzero-memory --table time       # step time, plain ZeRO-3 against ZeRO++ hpZ, on 1-16 nodes

How the package reads, in the order a plan is made:

- ``architectures.py``: the model catalogue (:class:`Architecture`, the built-in OPT and LLaMA-2
  sizes, a Hugging Face ``config.json`` from a path or the hub cache);
- ``settings.py``: the ZeRO-3 settings read from a DeepSpeed config (:class:`ZeroSettings`, through
  :func:`subzero_ds.config.parse`), the :class:`Cluster` and the :class:`BatchShape`;
- ``zo_step.py``: what a rank holds during a ZO step, item by item (the model of memory and its
  sources, in its docstring);
- ``step_time.py``: how long the step takes: parameter all-gathers within and across nodes (plain
  ZeRO-3 or ZeRO++ hpZ) at the links' rates, plus the forwards' FLOPs (the model, in its docstring);
- ``first_order.py``: the first-order AdamW comparison (DeepSpeed's own ZeRO-3 estimator +
  backward activations);
- ``estimate.py``: :func:`estimate`, the verdict and the advice (to fit, and hpZ to go faster);
- ``report.py``: the per-run report, the published prediction table and the step-time table;
- ``cli.py``: the ``subzero-memory`` command (also ``python -m subzero_ds.memory``).
"""

from __future__ import annotations

from .architectures import BUILTIN_MODELS, Architecture, architecture_from_config, load_architecture
from .cli import main
from .errors import MemoryPlanError
from .estimate import Estimate, estimate
from .first_order import deepspeed_model_states
from .report import TABLE_MODELS, TABLE_NODES, TIME_TABLE_MODELS, TIME_TABLE_NODES, prediction_table, step_time_table
from .settings import DTYPE_BYTES, GiB, BatchShape, Cluster, Offload, ZeroSettings, load_zero_settings
from .step_time import StepTime, gather_bytes, step_time
from .zo_step import Item

__all__ = [
    "BUILTIN_MODELS", "DTYPE_BYTES", "GiB", "TABLE_MODELS", "TABLE_NODES", "TIME_TABLE_MODELS", "TIME_TABLE_NODES",
    "Architecture", "BatchShape", "Cluster", "Estimate", "Item", "MemoryPlanError", "Offload", "StepTime",
    "ZeroSettings", "architecture_from_config", "deepspeed_model_states", "estimate", "gather_bytes",
    "load_architecture", "load_zero_settings", "main", "prediction_table", "step_time", "step_time_table",
]
