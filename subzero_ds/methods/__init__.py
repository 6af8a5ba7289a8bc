"""ZO methods, one file each, assembled from the ``"subzero"`` section.

A method is three separable choices (:mod:`~subzero_ds.methods.base`): its direction (``mezo.py``,
``subzero.py``, ``sparse_mezo.py``, ``hizoo.py``), its estimator (``estimators.py``) and its
update rule (``sgd.py``, ``momentum.py``, ``adam.py``; HiZOO brings its own).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Method, SubZeroConfig, Update
from .adam import Adam
from .base import Direction, LowRank, UpdateRule
from .estimators import Estimator, Probe
from .hizoo import HessianDirection, HessianUpdate
from .mezo import GaussianDirection
from .momentum import Momentum
from .sgd import SGD
from .sparse_mezo import SparseDirection
from .subzero import SubspaceDirection

__all__ = ["Direction", "Estimator", "GaussianDirection", "LowRank", "Probe", "SubspaceDirection", "UpdateRule",
           "ZOMethod", "build"]


@dataclass(frozen=True)
class ZOMethod:
    """The direction, estimator and update rule of one configured method."""

    direction: Direction
    estimator: Estimator
    update: UpdateRule


def build(config: SubZeroConfig, reshape: bool) -> ZOMethod:
    """The method the config asks for (``reshape``: SubZero's near-square view, resolved from "auto")."""
    if config.method is Method.HIZOO:
        direction = HessianDirection(config.seed)
        return ZOMethod(direction, Estimator(clean=True),
                        HessianUpdate(direction, config.weight_decay, config.hessian_smooth))
    if config.method is Method.SPARSE_MEZO:
        direction = SparseDirection(config.seed, config.sparsity, config.mask_interval)
    elif config.method is Method.MEZO:
        direction = GaussianDirection(config.seed)
    else:
        direction = SubspaceDirection(config.seed, config.rank, config.subspace_interval, reshape)
    q, decay = config.queries, config.weight_decay
    rule = {
        Update.SGD: lambda: SGD(direction, decay, q),
        Update.MOMENTUM: lambda: Momentum(direction, decay, q, config.momentum, config.state_on_refresh),
        Update.ADAM: lambda: Adam(direction, decay, q, tuple(config.betas), config.adam_eps, config.state_on_refresh),
    }[config.update]()
    return ZOMethod(direction, Estimator(queries=q), rule)
