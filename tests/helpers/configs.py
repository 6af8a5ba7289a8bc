"""DeepSpeed configs for tests: one set of ZO defaults that serves every registered method."""

from __future__ import annotations

from typing import Any

from subzero_ds.config.subzero import drop_other_methods_keys

# Small, fast settings: SubZero's rank 4 and a window of 5 steps (a refresh inside short runs).
DEFAULTS = {"lr": 1e-3, "eps": 1e-3, "rank": 4, "subspace_interval": 5, "seed": 1}


def zo_section(method: str = "subzero", **settings: Any) -> dict[str, Any]:
    """A ``"subzero"`` section for ``method``: :data:`DEFAULTS` and ``settings``, without the keys that
    belong to other methods (so SubZero's ``rank`` never reaches a MeZO run)."""
    return drop_other_methods_keys({**DEFAULTS, "method": method, **settings})


def zo_config(method: str = "subzero", stage: int = 3, persistence: int | None = None, bf16: bool = False,
              **settings: Any) -> dict[str, Any]:
    """A whole DeepSpeed config: ZeRO ``stage`` (persistence threshold if given), optional bf16, and
    :func:`zo_section`."""
    zero: dict[str, Any] = {"stage": stage}
    if persistence is not None:
        zero["stage3_param_persistence_threshold"] = persistence
    config: dict[str, Any] = {"zero_optimization": zero, "subzero": zo_section(method, **settings)}
    if bf16:
        config["bf16"] = {"enabled": True}
    return config
