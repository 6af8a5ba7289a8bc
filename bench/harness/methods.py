"""The ZO methods a benchmark can run, read from the package's registry: a newly registered method or
update rule is benchmarkable without an edit in bench/."""

from __future__ import annotations

from subzero_ds.config.subzero import CoreSettings
from subzero_ds.methods import registry
from subzero_ds.methods.registry import MethodSpec

DEFAULT_UPDATE = CoreSettings.model_fields["update"].default  # "sgd"


def zo_methods() -> dict[str, dict[str, str]]:
    """Benchmark name -> its ``"subzero"`` settings, in registration order.

    Every registered method under its own name (with the default update rule), and
    ``<method>-<rule>`` for each other update rule it allows (``subzero-adam``); a method that
    brings its own update rule (HiZOO) has only its own name.
    """
    methods: dict[str, dict[str, str]] = {}
    for name in registry.method_names():
        spec = registry.method(name)
        methods[name] = {"method": name}
        if spec.update_rule is None:
            methods.update({f"{name}-{rule}": {"method": name, "update": rule}
                            for rule in spec.updates if rule != DEFAULT_UPDATE})
    return methods


def method_spec(name: str) -> MethodSpec:
    """The registered method behind benchmark name ``name`` (``subzero-adam`` → SubZero's spec)."""
    return registry.method(zo_methods()[name]["method"])


def update_rule(name: str) -> str:
    """The update rule benchmark name ``name`` runs with."""
    return zo_methods()[name].get("update", DEFAULT_UPDATE)
