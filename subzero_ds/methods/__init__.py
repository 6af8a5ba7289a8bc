"""ZO methods and update rules, one file each, found through the registry.

A method is three separable choices (``base.py``): its direction (``mezo.py``, ``subzero.py``,
``sparse_mezo.py``, ``hizoo.py``), its estimator (``estimators.py``) and its update rule
(``sgd.py``, ``momentum.py``, ``adam.py``; HiZOO brings its own). Each file registers itself
(``registry.py``) when imported below; :func:`build` assembles the configured one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import registry
from .base import Direction, LowRank, UpdateRule
from .estimators import Estimator, Probe

# Importing a method's or an update rule's file registers it.
from . import mezo, subzero, hizoo, sparse_mezo, rademacher  # noqa: E402,F401  (methods)
from . import sgd, momentum, adam  # noqa: E402,F401  (update rules)

if TYPE_CHECKING:
    from ..config import SubZeroConfig

__all__ = ["Direction", "Estimator", "LowRank", "Probe", "UpdateRule", "ZOMethod", "build", "registry"]


@dataclass(frozen=True)
class ZOMethod:
    """The direction, estimator and update rule of one configured method."""

    direction: Direction
    estimator: Estimator
    update: UpdateRule


def build(config: SubZeroConfig, frozen_parameters: bool = False, queries: int | None = None) -> ZOMethod:
    """The method the config asks for.

    Args:
        config: the validated ``"subzero"`` section.
        frozen_parameters: whether the model has frozen parameters (PEFT), which SubZero's
            ``"reshape": "auto"`` follows.
        queries: directions per step over all replica groups (default ``config.queries``).
    """
    spec = registry.method(config.method)
    direction = spec.direction(config.options, config.seed, frozen_parameters)
    build_update = spec.update_rule or registry.update(config.update).build
    return ZOMethod(direction, spec.estimator(queries or config.queries), build_update(direction, config))
