"""The language-model loss of a forward, computed in row chunks.

Hugging Face's causal/masked-LM loss upcasts the whole logits tensor to fp32 and log-softmaxes it:
two more logits-sized tensors (for OPT-125M at 16 × 128 tokens, 2 × 412 MB) at the peak of a ZO
step, which otherwise needs little beyond inference. The same mean token cross-entropy, summed
over chunks of rows, holds only one chunk's fp32 copy at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 22  # fp32 upcast + log-softmax of one chunk: 2 × 16 MiB
CHUNKED_LOSS_TYPES = ("ForCausalLM", "ForMaskedLM")


def loss_type(model: nn.Module) -> str | None:
    """The model's Hugging Face loss type ("ForCausalLM", "ForMaskedLM", …; None if it has none), peft unwrapped."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "loss_type", None)


def language_model_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss ``model``'s forward computes from ``labels``, without materialising fp32 logits."""
    targets = token_targets(model, labels, logits.shape[1]).reshape(-1).to(logits.device)
    return chunked_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)


def token_targets(model: nn.Module, labels: torch.Tensor, length: int) -> torch.Tensor:
    """The target of each logits position (rows × ``length``; -100: not scored).

    Causal LMs (and models without a loss type) predict token t+1 at position t; masked LMs score
    every labelled position. Labels of -100 are ignored. Logits longer than the labels (peft prompt
    tuning prepends virtual tokens) get ignored labels for the extra leading positions, as peft does.
    """
    virtual = length - labels.shape[1]
    if virtual > 0:
        labels = torch.cat([labels.new_full((labels.shape[0], virtual), IGNORE_INDEX), labels], dim=1)
    if loss_type(model) != "ForMaskedLM":
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return labels


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean fp32 cross-entropy of ``logits`` (rows × vocab) over ``targets`` ≠ -100, a chunk of rows at a time."""
    total = summed_cross_entropy(lambda start, stop: logits.narrow(0, start, stop - start), targets, logits.shape[-1])
    return total / (targets != IGNORE_INDEX).sum()


def summed_cross_entropy(logits_of: Callable[[int, int], torch.Tensor], targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Summed fp32 cross-entropy over ``targets`` ≠ -100, asking ``logits_of(start, stop)`` for the
    logits of one chunk of rows at a time (at most ``CHUNK_ELEMENTS`` logits)."""
    rows = max(1, CHUNK_ELEMENTS // vocab)
    total = torch.zeros((), dtype=torch.float32, device=targets.device)
    for start in range(0, targets.shape[0], rows):
        stop = min(start + rows, targets.shape[0])
        chunk = logits_of(start, stop).float()
        total += F.cross_entropy(chunk, targets.narrow(0, start, stop - start), ignore_index=IGNORE_INDEX,
                                 reduction="sum")
    return total


def scores_language_model(model: nn.Module, batch: Any) -> bool:
    """Whether ``batch`` has labels for a causal- or masked-LM loss of ``model``: the losses computed here."""
    return isinstance(batch, Mapping) and batch.get("labels") is not None and loss_type(model) in CHUNKED_LOSS_TYPES


def no_cache(model: nn.Module) -> dict[str, bool]:
    """``use_cache=False`` for models that take it: a loss forward needs no KV cache."""
    return {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}


def model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss``, with the language-model loss computed in chunks (no KV cache)."""
    if scores_language_model(model, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return language_model_loss(model, model(**inputs, **no_cache(model)).logits, batch["labels"])
    output = model(**batch, **no_cache(model))
    if getattr(output, "loss", None) is None:
        raise ValueError(
            "the model returned no loss for this batch: include `labels` in the batch, or pass "
            "`loss_fn(model, batch) -> Tensor` to subzero_ds.initialize."
        )
    return output.loss
