"""The state of a momentum-like update rule, one entry per trainable parameter.

A parameter gets either state in its direction's own coordinates (SubZero's r×r per matrix, from
:meth:`Direction.coordinate_state`) or fp32 tensors over its write range, sharded exactly like the
parameter. Momentum and Adam each hold one :class:`Moments`; checkpoints see its tensors and scalars.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Direction, StateTensor, WriteRange


class Moments:
    """Named fp32 state tensors ("momentum"; "m", "v") for every parameter an update rule writes.

    Args:
        direction: the method's direction (it may keep a parameter's state in its coordinates).
        kinds: the names of the state tensors.
    """

    def __init__(self, direction: Direction, kinds: tuple[str, ...]) -> None:
        self.direction, self.kinds = direction, kinds
        self.full: dict[str, tuple[WriteRange, dict[str, torch.Tensor]]] = {}  # name -> (range, kind -> tensor)
        self.coordinates: dict[str, Any] = {}  # name -> the direction's coordinate state

    def allocate_(self, ranges: list[WriteRange]) -> None:
        """Zero state for every parameter of ``ranges``."""
        for target in ranges:
            state = self.direction.coordinate_state(target, self.kinds)
            if state is not None:
                self.coordinates[target.name] = state
            else:
                self.full[target.name] = (target, {kind: target.zeros() for kind in self.kinds})

    def slices(self, name: str, start: int, size: int) -> dict[str, torch.Tensor]:
        """The parameter-sized state of ``name`` over its flat range [start, start + size)."""
        owner, tensors = self.full[name]
        return {kind: tensor.narrow(0, start - owner.start, size) for kind, tensor in tensors.items()}

    def projected_coordinates(self, name: str, grads: list[float], step: int) -> torch.Tensor:
        """(1/q)·Σ_j g_j·Z_{t,j}: the step's estimate in the direction's coordinates of ``name``."""
        state = self.coordinates[name]
        total = torch.zeros_like(next(iter(state.tensors.values())))
        for query, grad in enumerate(grads):
            total.add_(state.coordinates(step, query), alpha=grad / len(grads))
        return total

    def state(self) -> list[StateTensor]:
        """Every tensor, for checkpoints (a coordinate state is whole on every rank)."""
        entries = [StateTensor(f"{name}::{kind}", tensor, owner.shape, owner.start)
                   for name, (owner, tensors) in self.full.items() for kind, tensor in tensors.items()]
        entries += [StateTensor(f"{name}::subspace_{kind}", tensor, tuple(tensor.shape), 0, replicated=True)
                    for name, state in self.coordinates.items() for kind, tensor in state.tensors.items()]
        return entries

    def scalars(self) -> dict[str, Any]:
        """Each coordinate state's window and update count, the same on every rank."""
        return {"subspace": {name: [s.window, s.updates] for name, s in self.coordinates.items()}}

    def load_scalars_(self, values: dict[str, Any]) -> None:
        """Restore what :meth:`scalars` returned."""
        for name, (window, updates) in values.get("subspace", {}).items():
            self.coordinates[name].window, self.coordinates[name].updates = window, updates
