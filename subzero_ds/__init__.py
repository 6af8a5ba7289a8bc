"""subzero_ds: zeroth-order (SubZero, MeZO) fine-tuning inside DeepSpeed ZeRO-3.

    engine = subzero_ds.initialize(model=model, config="ds_configs/zero3_subzero.json")
    result = engine.step(batch)

The public names are imported lazily, so light tools (``subzero-plot``) do not pay for
importing DeepSpeed.
"""

import warnings
from enum import Enum
from importlib import import_module
from typing import Any

__version__ = "0.1.0"
_PUBLIC = {
    "initialize": "api",
    "SubZeroEngine": "engine",
    "StepResult": "engine",
    "NonFiniteLossError": "engine",
    "SubZeroConfig": "config",
    "ConfigError": "config",
    "ShardWriter": "writer",
    "Reshape": "methods.subzero",
}
# Old public names: still importable, with a warning naming the new one.
_DEPRECATED = {
    "ZOOptimizer": ("writer", "ShardWriter"),
}
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    if name == "Method":  # the methods are now registered, not an enum: this one lists them
        warnings.warn("subzero_ds.Method is deprecated: methods are registered by name "
                      "(subzero_ds.methods.registry.method_names()).", DeprecationWarning, stacklevel=2)
        from .methods import registry

        return Enum("Method", {n.upper(): n for n in registry.method_names()}, type=str)
    if name in _DEPRECATED:
        module, new = _DEPRECATED[name]
        warnings.warn(f"subzero_ds.{name} is deprecated: use subzero_ds.{new}.", DeprecationWarning, stacklevel=2)
        return getattr(import_module(f".{module}", __name__), new)
    raise AttributeError(f"module 'subzero_ds' has no attribute {name!r}")
