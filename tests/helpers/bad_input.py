"""The bad-input tests' shared generators: hypothesis settings, JSON values of every kind, and the
property table of the "subzero" section (which values each setting accepts, which method or update
rule owns it). Used by tests/config/test_config_errors.py and tests/cli/test_cli_errors.py
(the table), and tests/tasks/test_task_errors.py (the settings and values)."""

import math

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from subzero_ds.methods import registry

FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))

# JSON values of every kind, for keys that want one particular kind.
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# key -> (is the value acceptable?) for every setting of the "subzero" section.
ACCEPTS = {
    "reshape": lambda v: v in ("auto", "always", "never"),
    "update_rounding": lambda v: v in ("nearest", "stochastic"),
    "replica_mode": lambda v: v in ("data", "perturbation"),
    "lr": lambda v: is_number(v) and math.isfinite(v) and v >= 0,
    "eps": lambda v: is_number(v) and math.isfinite(v) and v > 0,
    "collective_timeout": lambda v: is_number(v) and math.isfinite(v) and v > 0,
    "weight_decay": lambda v: is_number(v) and math.isfinite(v) and v >= 0,
    "rank": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "subspace_interval": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "max_consecutive_skips": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "seed": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63,
    "fused": lambda v: isinstance(v, bool),
    "method": lambda v: isinstance(v, str) and v in registry.method_names(),
    "update": lambda v: isinstance(v, str) and v in registry.update_names(),
    "queries": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "momentum": lambda v: is_number(v) and math.isfinite(v) and 0 <= v < 1,
    "betas": lambda v: isinstance(v, list) and len(v) == 2 and all(is_number(b) and math.isfinite(b) and 0 <= b < 1
                                                                    for b in v),
    "adam_eps": lambda v: is_number(v) and math.isfinite(v) and v > 0,
    "state_on_refresh": lambda v: v in ("reset", "project"),
    "hessian_smooth": lambda v: is_number(v) and math.isfinite(v) and 0 <= v <= 1,
    "sparsity": lambda v: is_number(v) and math.isfinite(v) and 0 < v < 1,
    "mask_interval": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
}


# key -> ("method" | "update", its name) for the keys a method or an update rule owns; the rest are core keys.
OWNERS = {key: (kind, name) for kind, names, spec in (("method", registry.method_names(), registry.method),
                                                      ("update", registry.update_names(), registry.update))
          for name in names for key in spec(name).options.model_fields}


def foreign(section: dict, key: str) -> bool:
    """Whether ``key`` belongs to a method or update rule other than the section's."""
    if key not in OWNERS:
        return False
    kind, name = OWNERS[key]
    return section.get(kind, "subzero" if kind == "method" else "sgd") != name

