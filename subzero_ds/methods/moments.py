"""The state of a momentum-like update rule, one entry per trainable parameter.

A parameter gets either state in its direction's own coordinates (SubZero's r×r per matrix, from
:meth:`Direction.coordinate_state`) or fp32 tensors over its write range, sharded exactly like the
parameter. Momentum and Adam each hold one :class:`Moments`; checkpoints see its tensors and scalars.
"""

from __future__ import annotations

from typing import Any, Callable

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
        # (name, secondary) -> (range, kind -> tensor): a parameter's range, and its hpZ secondary range
        self.full: dict[tuple[str, bool], tuple[WriteRange, dict[str, torch.Tensor]]] = {}
        self.coordinates: dict[str, Any] = {}  # name -> the direction's coordinate state
        self._stepped: dict[str, tuple[int, torch.Tensor]] = {}  # name -> (step, its coordinates that step)

    def allocate_(self, ranges: list[WriteRange]) -> None:
        """Zero state for every parameter of ``ranges`` (a coordinate state once per parameter)."""
        for target in ranges:
            state = self.direction.coordinate_state(target, self.kinds)
            if state is not None:
                self.coordinates.setdefault(target.name, state)
            else:
                self.full[target.name, target.secondary] = (target, {kind: target.zeros() for kind in self.kinds})

    def slices(self, target: WriteRange, start: int, size: int) -> dict[str, torch.Tensor]:
        """The parameter-sized state of ``target``'s range over the flat positions [start, start + size)."""
        owner, tensors = self.full[target.name, target.secondary]
        return {kind: tensor.narrow(0, start - owner.start, size) for kind, tensor in tensors.items()}

    def once_per_step(self, name: str, step: int, advance: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The coordinates ``name``'s state gives at ``step``: ``advance()`` (which moves the state) the first
        time, the same tensor for the other write range of the step (hpZ's secondary copy)."""
        stepped = self._stepped.get(name)
        if stepped is None or stepped[0] != step:
            stepped = self._stepped[name] = (step, advance())
        return stepped[1]

    def projected_coordinates(self, name: str, grads: list[float], step: int) -> torch.Tensor:
        """(1/q)·Σ_j g_j·Z_{t,j}: the step's estimate in the direction's coordinates of ``name``."""
        return self.coordinates[name].mean_coordinates(step, grads)

    def state(self) -> list[StateTensor]:
        """Every tensor, for checkpoints (a coordinate state is whole on every rank)."""
        entries = self._parameter_sized(secondary=False)
        entries += [StateTensor(f"{name}::subspace_{kind}", tensor, tuple(tensor.shape), 0, replicated=True)
                    for name, state in self.coordinates.items() for kind, tensor in state.tensors.items()]
        return entries

    def copies(self) -> list[StateTensor]:
        """The parameter-sized state of hpZ's secondary ranges (checkpoints load it, other ranks save it)."""
        return self._parameter_sized(secondary=True)

    def _parameter_sized(self, secondary: bool) -> list[StateTensor]:
        return [StateTensor(f"{name}::{kind}", tensor, owner.shape, owner.start)
                for (name, of_copy), (owner, tensors) in self.full.items() if of_copy == secondary
                for kind, tensor in tensors.items()]

    def scalars(self) -> dict[str, Any]:
        """Each coordinate state's window and update count, the same on every rank."""
        return {"subspace": {name: [s.window, s.updates] for name, s in self.coordinates.items()}}

    def load_scalars_(self, values: dict[str, Any]) -> None:
        """Restore what :meth:`scalars` returned."""
        for name, (window, updates) in values.get("subspace", {}).items():
            self.coordinates[name].window, self.coordinates[name].updates = window, updates
