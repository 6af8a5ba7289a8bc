"""How a step's probes are measured: two strategies behind one interface.

A probe is the model at θ + sign·ε·D_{t,j} (sign ±1, query j) or at θ itself (sign 0, HiZOO's ℓ0);
the method's estimator lists them. Both strategies return every probe's loss on a micro-batch, in
the estimator's order (0.0 for a probe another replica group measures, ``zero/replicas.py``), and
leave θ where the update expects it:

- :class:`InPlaceProbes` writes θ ± εD into the shards before each forward, from a backup of θ
  taken at the step's first micro-batch; the update then reads θ from that backup.
- :class:`FusedProbes` never touches the shards: one forward over the doubled batch [B; B] gives
  ℓ+ and ℓ− of a query, side paths adding ±εD's contribution to each half (``fused/``); the
  update reads θ from the shards.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from .fused import FusedPass, half_losses
from .loss import LossFn, computes_language_model_loss, forward_loss
from .methods import Estimator
from .phases import phase
from .writer import Backup, ShardWriter
from .zero.replicas import Replicas


class Probes(Protocol):
    """One way of measuring a step's probes."""

    theta: Backup | None
    """Where the update reads θ from: the backup (in place) or None (the shards themselves)."""

    def begin_step_(self) -> None:
        """Before a step's first micro-batch."""

    def losses(self, batch: Any, step: int) -> list[float]:
        """Every probe's loss on this rank's micro-batch ``batch``, in the estimator's order."""

    def restore_(self) -> None:
        """Put θ back exactly as the step found it (between micro-batches, and when the update is skipped)."""


class InPlaceProbes:
    """Perturb the shards in place, a forward per probe; θ comes back bit for bit from a backup.

    Args:
        model: the (DeepSpeed-wrapped) model.
        writer: writes this rank's shards.
        estimator: the method's probes.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        replicas: which of the probes this rank measures.
    """

    def __init__(self, model: nn.Module, writer: ShardWriter, estimator: Estimator, loss_fn: LossFn,
                 replicas: Replicas = Replicas()) -> None:
        self.model, self.writer, self.estimator, self.loss_fn = model, writer, estimator, loss_fn
        self.replicas = replicas
        self.theta = Backup(writer.shards)
        self._perturbed = False

    def begin_step_(self) -> None:
        self.theta.save_()  # θ does not change before the update

    def losses(self, batch: Any, step: int) -> list[float]:
        losses = []
        for probe in self.estimator.probes():
            if not self.replicas.evaluates(probe):
                losses.append(0.0)
                continue
            if probe.sign:
                self.writer.perturb_(step, probe.sign, probe.query, self.theta)
                self._perturbed = True
            elif self._perturbed:
                self.restore_()
            with phase("forward"):
                losses.append(forward_loss(self.loss_fn, self.model, batch))
        return losses

    def restore_(self) -> None:
        self.writer.restore_(self.theta)
        self._perturbed = False


class FusedProbes:
    """ℓ+ and ℓ− of each query from one forward over [B; B]; the shards are never perturbed.

    Args:
        model: the (DeepSpeed-wrapped) model.
        writer: writes this rank's shards (its shards and direction key the side paths).
        estimator: the method's probes.
        eps: ε.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; one that declares
            ``computes_language_model_loss`` is scored inside the LM head, both halves in one pass.
        replicas: which of the probes this rank measures.
    """

    theta = None

    def __init__(self, model: nn.Module, writer: ShardWriter, estimator: Estimator, eps: float,
                 loss_fn: LossFn, replicas: Replicas = Replicas()) -> None:
        self.model, self.estimator, self.loss_fn, self.replicas = model, estimator, loss_fn, replicas
        self.fused = FusedPass(model, writer.shards, writer.method.direction, eps)

    def begin_step_(self) -> None:
        pass

    def losses(self, batch: Any, step: int) -> list[float]:
        self.model.eval()  # dropout off: both halves must see the same function
        losses = []
        for probe in self.estimator.probes():
            if not self.replicas.evaluates(probe):
                losses.append(0.0)
                continue
            with phase("forward"), torch.no_grad():
                if probe.sign == 0:
                    losses.append(forward_loss(self.loss_fn, self.model, batch))
                elif probe.sign > 0:
                    losses.extend(self._pair(batch, step, probe.query))
        return losses

    def restore_(self) -> None:
        pass  # nothing was written

    def _pair(self, batch: Any, step: int, query: int) -> tuple[float, float]:
        if computes_language_model_loss(self.loss_fn) and self.fused.serves_language_model_loss(batch):
            return self.fused.language_model_losses(batch, step, query)
        with self.fused.active(step, query=query):
            return half_losses(self.loss_fn, self.model, batch)
