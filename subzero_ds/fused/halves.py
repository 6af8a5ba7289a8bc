"""ℓ+ and ℓ− of any loss function from one forward per model call over [B; B]: the loss function runs twice
against stand-ins for the model, each handed its half of every (doubled) model call's output."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..loss import CHUNKED_LOSS_TYPES, logits_loss, loss_type
from .batches import FusedPassError, doubled, take_half


def half_losses(loss_fn: Callable[[nn.Module, Any], torch.Tensor], model: nn.Module, batch: Any) -> tuple[float, float]:
    """(ℓ+, ℓ−) of ``loss_fn(model, batch)`` from one model forward per model call, on the doubled batch.

    ``loss_fn`` runs twice against stand-ins for ``model``. In the first run each model call runs
    the real model once with every tensor argument doubled along dim 0; both runs get their half
    of that output. Labels are held back from the doubled call and each half's loss is computed
    with the model's own loss function, as its forward would.
    """
    cache: list[tuple[Any, Any]] = []
    losses = []
    for half in (0, 1):
        stand_in = _HalfModel(model, cache, half)
        losses.append(float(loss_fn(stand_in, batch).detach().float()))
        if stand_in.calls != len(cache):
            raise FusedPassError(
                f"the loss function called the model {len(cache)} times for ℓ+ but {stand_in.calls} times for "
                "ℓ−: the fused ± pass needs a loss function that calls the model the same way each time. "
                'Make it deterministic, or set "fused": false in the "subzero" section.'
            )
    return losses[0], losses[1]


class _HalfModel:
    """Stands in for the model inside ``loss_fn``: one half of each fused model call's output."""

    def __init__(self, model: nn.Module, cache: list[tuple[Any, Any]], half: int) -> None:
        self._model, self._cache, self._half, self.calls = model, cache, half, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._half == 0:
            labels = kwargs.pop("labels", None)
            output = self._model(*doubled(args), **doubled(kwargs))
            self._cache.append((output, labels))
        elif self.calls >= len(self._cache):
            raise FusedPassError(
                "the loss function called the model more often for ℓ− than for ℓ+: the fused ± pass needs the "
                'same calls each time. Make it deterministic, or set "fused": false in the "subzero" section.'
            )
        output, labels = self._cache[self.calls]
        self.calls += 1
        output = take_half(output, self._half)
        if labels is not None:
            output["loss"] = _model_loss(self._model, output["logits"], labels)
        return output

    forward = __call__

    def get_output_embeddings(self) -> None:
        """None: the loss function must score the logits this stand-in returns, not inside the real LM head."""
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _model_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss the model's forward computes from ``labels`` (causal and masked LMs), in chunks."""
    kind = loss_type(model) or "ForCausalLM"
    if kind not in CHUNKED_LOSS_TYPES:
        raise FusedPassError(
            f"the fused ± pass computes ℓ+ and ℓ− from the logits, and knows causal- and masked-LM losses only; "
            f"this model's loss type is {kind!r}. Pass `loss_fn(model, batch)` computing the loss from "
            'the logits to subzero_ds.initialize, or set "fused": false in the "subzero" section.'
        )
    return logits_loss(model, logits, labels)
