"""ZO methods: one file each, behind the interfaces of :mod:`subzero_ds.methods.base`."""

from .base import Direction, LowRank
from .mezo import GaussianDirection
from .subzero import SubspaceDirection

__all__ = ["Direction", "GaussianDirection", "LowRank", "SubspaceDirection"]
