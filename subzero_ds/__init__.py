"""subzero_ds: zeroth-order (SubZero, MeZO) fine-tuning inside DeepSpeed ZeRO-3.

    engine = subzero_ds.initialize(model=model, config="ds_configs/zero3_subzero.json")
    result = engine.step(batch)
"""

from .config import ConfigError, Method, Reshape, SubZeroConfig
from .engine import StepResult, SubZeroEngine
from .initialize import initialize

__all__ = ["initialize", "SubZeroEngine", "SubZeroConfig", "StepResult", "ConfigError", "Method", "Reshape"]
__version__ = "0.1.0"
