"""subzero_ds: zeroth-order (SubZero, MeZO) fine-tuning inside DeepSpeed ZeRO-3.

    engine = subzero_ds.initialize(model=model, config="ds_configs/zero3_subzero.json")
    result = engine.step(batch)

The public names are imported lazily, so light tools (``subzero-plot``) do not pay for
importing DeepSpeed.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
_PUBLIC = {
    "initialize": "initialization",
    "SubZeroEngine": "engine",
    "StepResult": "engine",
    "NonFiniteLossError": "engine",
    "SubZeroConfig": "config",
    "ConfigError": "config",
    "Method": "config",
    "Reshape": "config",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'subzero_ds' has no attribute {name!r}")
