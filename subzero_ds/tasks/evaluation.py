"""Task evaluation across data-parallel ranks: candidate scoring, and greedy generation + F1/EM.

Under ZeRO-3 every forward pass is collective (each layer is all-gathered), so every rank runs
the same number of forwards: the samples are dealt round-robin and short shares are padded
with repeats that are not counted.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import nn

from .encoding import SampleEncoder, candidate_batch, candidate_scores
from ..distributed import get_world_size_and_rank, sum_over_ranks
from ..engine import to_device
from .qa_metrics import exact_match, token_f1
from .base import Sample, Task, TaskKind


def rank_share(samples: Sequence[Sample]) -> tuple[list[Sample], int]:
    """This rank's samples (padded to the same count on every rank) and how many are real."""
    world_size, rank = get_world_size_and_rank()
    mine = list(samples[rank::world_size])
    per_rank = -(-len(samples) // world_size)
    real = len(mine)
    return mine + [samples[0]] * (per_rank - real), real


def evaluate_task(
    model: nn.Module, task: Task, samples: Sequence[Sample], encoder: SampleEncoder,
    batch_size: int, max_new_tokens: int = 32, device: torch.device | None = None,
) -> dict[str, float]:
    """The task's metrics on ``samples`` (all ranks together; call on every rank).

    Returns:
        ``{"accuracy": …}`` for classification and multiple choice, ``{"f1": …, "exact_match": …}``
        for generation tasks; fractions in [0, 1].
    """
    if not samples:
        raise ValueError(f"no evaluation samples for task {task.name!r}")
    mine, real = rank_share(samples)
    model.eval()
    device = device or model_device(model)
    if task.kind is TaskKind.GENERATION:
        f1 = em = 0.0
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            predictions = greedy_generate(model, encoder, [s.prompt for s in chunk], max_new_tokens, device)
            for offset, (sample, prediction) in enumerate(zip(chunk, predictions)):
                if start + offset < real:
                    f1 += token_f1(prediction, sample.answers)
                    em += exact_match(prediction, sample.answers)
        f1, em, count = sum_over_ranks(f1, em, real)
        return {"f1": f1 / count, "exact_match": em / count}
    correct = 0.0
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        with torch.no_grad():
            predictions = candidate_scores(model, to_device(candidate_batch(chunk, encoder), device)).argmax(dim=1)
        for offset, (sample, prediction) in enumerate(zip(chunk, predictions.tolist())):
            if start + offset < real:
                correct += float(prediction == sample.gold)
    correct, count = sum_over_ranks(correct, real)
    return {"accuracy": correct / count}


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: its parameters' device (under ZeRO-3 their placeholders sit on the accelerator)."""
    return next(model.parameters()).device


def greedy_generate(model: nn.Module, encoder: SampleEncoder, prompts: Sequence[str], max_new_tokens: int,
                    device: torch.device | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batch, on ``device``), cut at the first newline or EOS.

    Always runs exactly ``max_new_tokens`` forwards, so ranks stay in step under ZeRO-3.
    """
    device = device or model_device(model)
    tokenizer = encoder.tokenizer
    rows = [encoder.pair(prompt, "")[0] for prompt in prompts]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[encoder.pad_id] * (width - len(r)) + r for r in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    for _ in range(max_new_tokens):
        extra = {"position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0)} if takes_positions else {}
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits[:, -1]
        next_ids = logits.argmax(dim=-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_ids], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids)], dim=1)
    texts = []
    for generated in input_ids[:, width:].tolist():
        if tokenizer.eos_token_id in generated:
            generated = generated[: generated.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(generated, skip_special_tokens=True).split("\n")[0].strip())
    return texts
