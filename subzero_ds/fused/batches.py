"""The doubled batch [B; B] of the fused ± pass: building it, and cutting a layer's inputs and outputs into
its two halves (the first half sees θ + εD, the second θ − εD)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FusedPassError(RuntimeError):
    """A model or loss function that the fused ± pass cannot serve (the fix: ``"fused": false``)."""


def doubled(values: Any) -> Any:
    """Every tensor in ``values`` (dicts, tuples and lists walked) stacked on itself in dim 0: [B; B]."""
    if isinstance(values, torch.Tensor):
        return torch.cat([values, values]) if values.ndim else values
    if isinstance(values, dict):
        return {k: doubled(v) for k, v in values.items()}
    if isinstance(values, (tuple, list)):
        return type(values)(doubled(v) for v in values)
    return values


def take_half(output: Any, half: int) -> Any:
    """Half ``half`` (0 or 1) of a model's output over [B; B]; a ModelOutput loses its loss (of the whole batch)."""
    if isinstance(output, torch.Tensor):
        return output.narrow(0, half * (output.shape[0] // 2), output.shape[0] // 2) if output.ndim else output
    if isinstance(output, dict):  # ModelOutput is a dict; copy it without its fused-batch loss
        halved = type(output)(**{k: take_half(v, half) for k, v in output.items() if k != "loss"})
        return halved
    if isinstance(output, (tuple, list)):
        return type(output)(take_half(v, half) for v in output)
    return output


def half_signs(rows: int, eps: float, ndim: int, module: nn.Module, device: torch.device | str = "cpu") -> torch.Tensor:
    """+ε for the first half of the rows, −ε for the second (on ``device``), shaped to broadcast over ``ndim`` dims."""
    if rows % 2:
        raise FusedPassError(
            f"{type(module).__name__} got an input with {rows} rows in dim 0; the fused ± pass needs the doubled "
            'batch [B; B] in dim 0 of every layer input. Set "fused": false in the "subzero" section for this model.'
        )
    half = torch.full((rows // 2,), eps, dtype=torch.float32, device=device)
    return torch.cat([half, -half]).view(rows, *([1] * (ndim - 1)))


def first_rows(args: tuple, kwargs: dict) -> int | None:
    """Rows in dim 0 of the first tensor argument with a dim 0, or None."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim:
            return value.shape[0]
    return None


def repeat_rows(output: Any, rows: int) -> Any:
    """``output`` (tensors with one row in dim 0, possibly nested in tuples) repeated to ``rows`` rows."""
    if isinstance(output, torch.Tensor):
        return output.expand(rows, *output.shape[1:]) if output.ndim and output.shape[0] == 1 else output
    if isinstance(output, (tuple, list)):
        return type(output)(repeat_rows(v, rows) for v in output)
    return output


def batch_rows(args: tuple, kwargs: dict, module: nn.Module) -> int:
    """Rows in dim 0 of the first tensor argument, which must split in halves (else FusedPassError)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim:
            half_signs(value.shape[0], 0.0, 1, module)  # raises unless the rows split in halves
            return value.shape[0]
    raise FusedPassError(f"{type(module).__name__} was called without a tensor input to split into ± halves.")


def half_of(values: Any, rows: int, which: int) -> Any:
    """Half ``which`` (0 or 1) of every tensor in ``values`` whose dim 0 has the doubled batch's ``rows``."""
    if isinstance(values, torch.Tensor):
        return values.narrow(0, which * rows // 2, rows // 2) if values.ndim and values.shape[0] == rows else values
    if isinstance(values, dict):
        return {k: half_of(v, rows, which) for k, v in values.items()}
    if isinstance(values, (tuple, list)):
        return type(values)(half_of(v, rows, which) for v in values)
    return values


def concat(outputs: list[Any], module: nn.Module) -> Any:
    """A layer's two half outputs (tensors, or tuples/lists of them) joined into its output over [B; B]."""
    first, second = outputs
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second]) if first.ndim else first
    if isinstance(first, (tuple, list)):
        return type(first)(concat([a, b], module) for a, b in zip(first, second))
    if first is None:
        return None
    raise FusedPassError(
        f"{type(module).__name__} returned {type(first).__name__}; the fused ± pass can only join tensor outputs "
        'of a layer run on two halves. Set "fused": false in the "subzero" section for this model.'
    )
