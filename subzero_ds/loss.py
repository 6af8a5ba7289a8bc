"""The language-model loss of a forward, scored a chunk of rows at a time: the package's one LM loss.

Hugging Face's causal/masked-LM loss takes the whole logits (batch × tokens × vocabulary), upcasts
them to fp32 and log-softmaxes them: for a 131,072-token vocabulary and 8 × 256 tokens that is
1 GiB of logits and 2 GiB more, at the peak of a ZO step that otherwise needs little beyond
inference. :func:`language_model_loss` computes the same mean token cross-entropy inside the LM
head's forward instead: the head's weight is gathered once (ZeRO-3's hooks run around the head's
call as usual) and each chunk of rows is projected, upcast and scored, so at most
``CHUNK_ELEMENTS`` logits exist at a time. The model's forward returns empty logits.

A loss function whose value is this loss (for batches :func:`scores_language_model` accepts) says
so with the attribute ``computes_language_model_loss = True``: the fused ± pass then scores both
halves of its doubled batch inside the head the same way (``fused/``). The engine's default,
:func:`model_loss`, and the CLI's LM training both do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 22  # fp32 upcast + log-softmax of one chunk: 2 × 16 MiB
CHUNKED_LOSS_TYPES = ("ForCausalLM", "ForMaskedLM")
# Config fields of models that transform the logits after the LM head (Gemma-2's softcapping, Cohere's
# and Granite's scales): their loss cannot be scored inside the head.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class LossScoringError(RuntimeError):
    """A model whose LM head does not run once per forward, so its loss cannot be scored inside it."""


def language_model_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The mean token cross-entropy of ``model`` (a causal or masked LM) on ``batch["labels"]``, in fp32,
    without the whole logits ever existing (scored inside the LM head where the model allows, without autograd).

    Labels of -100 are not scored; causal LMs predict token t+1 at position t (see :func:`token_targets`).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # Under autograd (a first-order baseline) the head runs as itself: ZeRO-3's backward hooks need its output
    # in the graph, and backward keeps every chunk's logits anyway, so scoring in the head would save nothing.
    head = scoring_head(model) if not torch.is_grad_enabled() else None
    if head is None:
        return logits_loss(model, model(**inputs, **no_cache(model)).logits, labels)
    with scored_in_head(model, head, labels) as scores:
        model(**inputs, **no_cache(model))
    return scores.losses()[0]


language_model_loss.computes_language_model_loss = True  # type: ignore[attr-defined]


def model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The engine's default loss: :func:`language_model_loss` for a causal/masked LM batch with labels,
    else ``model(**batch).loss``."""
    if scores_language_model(model, batch):
        return language_model_loss(model, batch)
    output = model(**batch, **no_cache(model))
    if getattr(output, "loss", None) is None:
        raise ValueError(
            "the model returned no loss for this batch: include `labels` in the batch, or pass "
            "`loss_fn(model, batch) -> Tensor` to subzero_ds.initialize."
        )
    return output.loss


model_loss.computes_language_model_loss = True  # type: ignore[attr-defined]


def computes_language_model_loss(loss_fn: LossFn) -> bool:
    """Whether ``loss_fn`` declares that its value is :func:`language_model_loss` (for the batches
    :func:`scores_language_model` accepts), so that faster ways to the same value may replace it."""
    return bool(getattr(loss_fn, "computes_language_model_loss", False))


def scores_language_model(model: nn.Module, batch: Any) -> bool:
    """Whether ``batch`` has labels for a causal- or masked-LM loss of ``model``."""
    return isinstance(batch, Mapping) and batch.get("labels") is not None and loss_type(model) in CHUNKED_LOSS_TYPES


def loss_type(model: nn.Module) -> str | None:
    """The model's Hugging Face loss type ("ForCausalLM", "ForMaskedLM", …; None if it has none), peft unwrapped."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "loss_type", None)


def scoring_head(model: nn.Module) -> nn.Linear | None:
    """The LM head whose forward can score the loss, or None: a plain ``nn.Linear`` output embedding of a
    model that does not transform its logits afterwards."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    transformed = any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)
    return head if type(head) is nn.Linear and not transformed else None


@dataclass
class HeadScores:
    """What :func:`scored_in_head` measured: per half of the batch, the summed token cross-entropy."""

    sums: list[torch.Tensor] = field(default_factory=list)
    scored: torch.Tensor | None = None  # tokens scored per half
    calls: int = 0

    def losses(self) -> list[torch.Tensor]:
        """The mean loss of each half (fp32 scalars on the head's device)."""
        if self.calls != 1:
            raise LossScoringError(
                f"the LM head ran {self.calls} times in one forward; its loss is scored inside the head, which "
                "needs exactly one call. Pass a `loss_fn` that computes the loss from the logits (and, with the "
                'fused ± pass, set "fused": false in the "subzero" section).')
        return [total / self.scored for total in self.sums]


@contextlib.contextmanager
def scored_in_head(model: nn.Module, head: nn.Linear, labels: torch.Tensor, halves: int = 1,
                   logits_of: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> Iterator[HeadScores]:
    """Within the block, ``head``'s forward scores its rows against ``labels`` and returns empty logits.

    Args:
        model: the model whose forward calls ``head`` once.
        head: its LM head (:func:`scoring_head`).
        labels: the labels of one half (rows × tokens).
        halves: how many copies of the batch the forward runs on, stacked in dim 0 (the fused pass: 2).
        logits_of: ``logits_of(rows, half) -> logits`` in place of the head's own projection (the fused
            pass adds its side path there).
    """
    scores = HeadScores()

    def head_forward(hidden: torch.Tensor) -> torch.Tensor:
        targets = token_targets(model, labels, hidden.shape[1]).reshape(-1).to(hidden.device)
        flat = hidden.reshape(-1, hidden.shape[-1])
        rows = flat.shape[0] // halves
        for half in range(halves):
            part = flat.narrow(0, half * rows, rows)

            def chunk(start: int, stop: int, part: torch.Tensor = part, half: int = half) -> torch.Tensor:
                block = part.narrow(0, start, stop - start)
                # ZeRO-3's hooks around the head's call gathered its weight
                return nn.Linear.forward(head, block) if logits_of is None else logits_of(block, half)

            scores.sums.append(summed_cross_entropy(chunk, targets, head.out_features))
        scores.scored = (targets != IGNORE_INDEX).sum()
        scores.calls += 1
        return hidden.new_zeros(*hidden.shape[:-1], 0)  # the model returns these as its logits

    with replaced_forward(head, head_forward):
        yield scores


def logits_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss ``model``'s forward computes from ``labels``, from given logits, a chunk of rows at a time."""
    targets = token_targets(model, labels, logits.shape[1]).reshape(-1).to(logits.device)
    flat = logits.reshape(-1, logits.shape[-1])
    total = summed_cross_entropy(lambda start, stop: flat.narrow(0, start, stop - start), targets, flat.shape[-1])
    return total / (targets != IGNORE_INDEX).sum()


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


def no_cache(model: nn.Module) -> dict[str, bool]:
    """``use_cache=False`` for models that take it: a loss forward needs no KV cache."""
    return {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}


def forward_loss(loss_fn: LossFn, model: nn.Module, batch: Any) -> float:
    """``loss_fn(model, batch)`` as a ZO probe computes it: dropout off, no autograd; a Python float."""
    model.eval()  # dropout off: every probe must see the same function
    with torch.no_grad():
        loss = loss_fn(model, batch)
    return float(loss.detach().float())


@contextlib.contextmanager
def replaced_forward(module: nn.Module, forward: Callable, name: str = "forward") -> Iterator[None]:
    """Within the block, ``module.<name>`` is ``forward`` (an instance attribute shadows the class's
    method; the module's hooks, ZeRO-3's gathers among them, still run around its call)."""
    setattr(module, name, forward)
    try:
        yield
    finally:
        delattr(module, name)
