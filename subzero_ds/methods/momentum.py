"""ZO-SGD with momentum: M ← βM + ĝ, θ ← θ − η(M + λθ), ĝ = (1/q)·Σ_j g_j·D_{t,j}.

MeZO-style full directions keep M parameter-sized (fp32, sharded like the parameter: 4 bytes per
trainable element per rank's share). SubZero keeps a matrix's M in its subspace coordinates,
r×r (:class:`~subzero_ds.methods.subzero.SubspaceState`): ĝ = μ·U·((1/q)Σ g_j Z_j)·Vᵀ, so
M = μ·U·M_c·Vᵀ with M_c ← βM_c + (1/q)Σ g_j Z_j, and the step writes μ·U·M_c·Vᵀ; non-matrix
parameters (biases, norms) keep full M.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..config import StateOnRefresh
from .base import Direction, StateTensor, UpdateRule, WriteRange
from .subzero import SubspaceDirection, SubspaceState


class Momentum(UpdateRule):
    """ZO momentum.

    Args:
        direction, weight_decay, queries: as for every update rule.
        beta: the momentum β.
        on_refresh: SubZero's subspace state at a window change (reset or project).
    """

    kinds = ("momentum",)

    def __init__(self, direction: Direction, weight_decay: float, queries: int, beta: float,
                 on_refresh: StateOnRefresh = StateOnRefresh.RESET) -> None:
        super().__init__(direction, weight_decay, queries)
        self.beta, self.on_refresh = beta, on_refresh
        self.full: dict[str, tuple[WriteRange, dict[str, torch.Tensor]]] = {}
        self.subspace: dict[str, SubspaceState] = {}

    def allocate_(self, ranges: list[WriteRange]) -> None:
        for target in ranges:
            if isinstance(self.direction, SubspaceDirection) and len(target.shape) == 2:
                self.subspace[target.name] = SubspaceState(self.direction, target.name, target.shape, self.kinds,
                                                           self.on_refresh is StateOnRefresh.PROJECT, target.device)
            else:
                self.full[target.name] = (target, {kind: target.zeros() for kind in self.kinds})

    def projected_coordinates(self, state: SubspaceState, update) -> torch.Tensor:
        """(1/q)·Σ_j g_j·Z_{t,j}: the step's estimate in subspace coordinates."""
        total = torch.zeros_like(next(iter(state.tensors.values())))
        for query, grad in enumerate(update.grads):
            total.add_(state.coordinates(update.step, query), alpha=grad / self.queries)
        return total

    def write_(self, target, out, src, start, update, rounding_key):
        decay = self.decay(target, update.lr)
        if target.name in self.subspace:
            state = self.subspace[target.name]
            state.enter_window_(update.step)
            moment = state.tensors["momentum"]
            moment.mul_(self.beta).add_(self.projected_coordinates(state, update))
            self.direction.apply_coordinates_(out, src, target.name, target.shape, update.step, start, moment,
                                              beta=decay, alpha=-update.lr, rounding_key=rounding_key)
            return
        owner, tensors = self.full[target.name]
        moment = tensors["momentum"].narrow(0, start - owner.start, out.numel())
        self.mean_direction_(moment, target, start, update, beta=self.beta)
        kernels.apply_(out, src, beta=decay, alpha=-update.lr, dense=moment, offset=start, rounding_key=rounding_key)

    def state(self) -> list[StateTensor]:
        return state_tensors(self.full, self.subspace)

    def scalars(self):
        return {"subspace": {name: [s.window, s.updates] for name, s in self.subspace.items()}}

    def load_scalars_(self, values):
        for name, (window, updates) in values.get("subspace", {}).items():
            self.subspace[name].window, self.subspace[name].updates = window, updates


def state_tensors(full: dict[str, tuple[WriteRange, dict[str, torch.Tensor]]],
                  subspace: dict[str, SubspaceState]) -> list[StateTensor]:
    """The checkpointable tensors of a momentum/Adam rule."""
    entries = [StateTensor(f"{name}::{kind}", tensor, owner.shape, owner.start)
               for name, (owner, tensors) in full.items() for kind, tensor in tensors.items()]
    entries += [StateTensor(f"{name}::subspace_{kind}", tensor, tuple(tensor.shape), 0, replicated=True)
                for name, state in subspace.items() for kind, tensor in state.tensors.items()]
    return entries
