"""The registry of ZO methods and update rules: everything the rest of the package knows about them.

A method file registers one :class:`MethodSpec` (its options, how to build its direction and
estimator, which update rules it allows, whether the fused ± pass can serve it, the state it
keeps); an update-rule file registers one :class:`UpdateSpec`. Config validation, the engine, the
memory planner, the sweeps and the benchmarks read these specs, so a new method is one file plus
its import in ``methods/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict

from .estimators import Estimator

if TYPE_CHECKING:
    from .base import Direction, UpdateRule


class Options(BaseModel):
    """The keys one method (or update rule) adds to the ``"subzero"`` section; each field documents itself."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoOptions(Options):
    """A method or update rule without keys of its own."""


@dataclass(frozen=True)
class MethodSpec:
    """One ZO method, as its file registers it.

    Attributes:
        name: the value of ``subzero.method``.
        summary: one line for the README and ``--help``.
        options: the pydantic model of the method's own keys.
        direction: ``direction(options, seed, reshape) -> Direction``.
        estimator: ``estimator(queries) -> Estimator`` (default: the two-point estimator over q queries).
        updates: the update rules (``subzero.update``) it allows.
        update_rule: ``update_rule(direction, config) -> UpdateRule`` for a method that brings its own
            (HiZOO); None: the configured update rule.
        fusable: whether the fused ± pass can serve it (its direction depends on position only).
        multi_query: whether it allows ``queries`` > 1.
        state_bytes_per_element: fp32 bytes of state the direction keeps per trainable element (HiZOO's H: 4).
        state_name: what that state is, as the memory planner's report names it ("Hessian H").
        working_chunk_bytes: scratch its writes allocate per chunk (the planner adds it).
        subspace_rank: ``subspace_rank(options) -> r`` for methods whose matrix directions live in a
            rank-r subspace (update-rule state then is r×r per matrix, and the planner counts the bases).
        direction_settings: the options that define its directions: a resume must keep them.
        rules: cross-field checks ``rule(config) -> problem or None`` beyond the generic ones.
        title: its name in prose and reports ("SubZero"); empty: ``name``.
    """

    name: str
    summary: str
    options: type[Options]
    direction: Callable[[Any, int, bool], Direction]
    estimator: Callable[[int], Estimator] = lambda queries: Estimator(queries=queries)
    updates: tuple[str, ...] = ("sgd", "momentum", "adam")
    update_rule: Callable[[Direction, Any], UpdateRule] | None = None
    fusable: bool = True
    multi_query: bool = True
    state_bytes_per_element: int = 0
    state_name: str = ""
    working_chunk_bytes: int = 0
    subspace_rank: Callable[[Any], int] | None = None
    direction_settings: tuple[str, ...] = ()
    rules: tuple[Callable[[Any], str | None], ...] = field(default=())
    title: str = ""

    def forwards_per_step(self, queries: int = 1) -> int:
        """Forward passes of one step over its batch (two per query; HiZOO's clean pass adds one)."""
        return len(self.estimator(queries).probes())


@dataclass(frozen=True)
class UpdateSpec:
    """One update rule (how g·D becomes Δθ), as its file registers it.

    Attributes:
        name: the value of ``subzero.update``.
        options: the pydantic model of its own keys.
        build: ``build(direction, config) -> UpdateRule``.
        state_bytes_per_element: fp32 bytes of state per trainable element (momentum 4, Adam 8).
        state_name: what that state is, as the memory planner's report names it ("Adam m, v").
        working_chunk_bytes: scratch its writes allocate per chunk.
    """

    name: str
    options: type[Options]
    build: Callable[[Direction, Any], UpdateRule]
    state_bytes_per_element: int = 0
    state_name: str = ""
    working_chunk_bytes: int = 0


_METHODS: dict[str, MethodSpec] = {}
_UPDATES: dict[str, UpdateSpec] = {}


def _add(registry: dict, spec, kind: str):
    if spec.name in registry:
        raise ValueError(f"{kind} {spec.name!r} is registered twice")
    registry[spec.name] = spec
    return spec


def _lookup(registry: dict, name: str, kind: str):
    if name not in registry:
        raise KeyError(f"unknown {kind} {name!r}; known: {', '.join(registry)}")
    return registry[name]


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method (called once, by its file)."""
    return _add(_METHODS, spec, "ZO method")


def register_update(spec: UpdateSpec) -> UpdateSpec:
    """Add an update rule (called once, by its file)."""
    return _add(_UPDATES, spec, "update rule")


def method(name: str) -> MethodSpec:
    """The registered method ``name``.

    Raises:
        KeyError: no such method (the message lists the known ones).
    """
    return _lookup(_METHODS, name, "ZO method")


def update(name: str) -> UpdateSpec:
    """The registered update rule ``name``.

    Raises:
        KeyError: no such rule (the message lists the known ones).
    """
    return _lookup(_UPDATES, name, "update rule")


def method_names() -> list[str]:
    """Every registered method, in registration order."""
    return list(_METHODS)


def update_names() -> list[str]:
    """Every registered update rule, in registration order."""
    return list(_UPDATES)
