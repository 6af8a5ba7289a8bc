"""Turn task samples into model batches, and the losses/scores computed from them.

Causal LMs see ``prompt + continuation`` tokens; only the continuation is scored or trained on.
Masked LMs see ``prompt + <mask>`` and score single-token label words at the mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import DataError, Sample

logger = logging.getLogger("subzero_ds")
IGNORE = -100


@dataclass
class SampleEncoder:
    """Tokenizes samples for one model.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        max_length: longest sequence fed to the model; longer prompts lose their beginning.
        masked_lm: True for RoBERTa-style models (label word predicted at the mask token).
        truncate: False turns an over-long example into a DataError instead of a warning.
    """

    tokenizer: object
    max_length: int
    masked_lm: bool = False
    truncate: bool = True
    _warned: bool = False

    def pair(self, prompt: str, continuation: str) -> tuple[list[int], int]:
        """Token ids of ``prompt + continuation`` and the index where the continuation starts.

        Raises:
            DataError: the example is longer than ``max_length`` and truncation is off, or even
                the whole prompt would not make room for it.
        """
        prompt_ids, continuation_ids = self._ids(prompt, continuation)
        overflow = len(prompt_ids) + len(continuation_ids) - self.max_length
        if overflow > 0:
            prompt_ids = self._cut(prompt_ids, len(continuation_ids), overflow, prompt)
        return prompt_ids + continuation_ids, len(prompt_ids)

    def length(self, prompt: str, continuation: str) -> int:
        """Tokens in ``prompt + continuation`` before any truncation."""
        prompt_ids, continuation_ids = self._ids(prompt, continuation)
        return len(prompt_ids) + len(continuation_ids)

    def _ids(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        if self.masked_lm:
            return self.tokenizer(prompt + self.tokenizer.mask_token, add_special_tokens=True)["input_ids"], []
        prompt_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if prompt_ids and prompt_ids[-1] == self.tokenizer.eos_token_id and self.tokenizer.eos_token_id != self.tokenizer.bos_token_id:
            prompt_ids = prompt_ids[:-1]  # tokenizers that append </s> would put it before the answer
        return prompt_ids, self.tokenizer(continuation, add_special_tokens=False)["input_ids"]

    def _cut(self, prompt_ids: list[int], continuation_length: int, overflow: int, prompt: str) -> list[int]:
        """Drop ``overflow`` prompt tokens after the start token, keeping a masked LM's mask and end tokens."""
        total = len(prompt_ids) + continuation_length
        if not self.truncate:
            raise DataError(
                f"an example is {total} tokens, over --max_length {self.max_length}: raise --max_length, or leave "
                f"out --no_truncation to cut over-long prompts from the left. Prompt starts: {prompt[:80]!r}"
            )
        head = 1 if prompt_ids and prompt_ids[0] == self.tokenizer.bos_token_id else 0
        if self.masked_lm and self.tokenizer.mask_token_id in prompt_ids:
            tail = prompt_ids[::-1].index(self.tokenizer.mask_token_id) + 1  # the mask and what follows it
        else:
            tail = 0 if head else 1  # a causal LM needs one prompt token to predict the answer's first
        if overflow > len(prompt_ids) - head - tail:
            raise DataError(
                f"an example is {total} tokens and cannot be cut to --max_length {self.max_length}: its answer and "
                f"special tokens alone take {total - len(prompt_ids) + head + tail}. Raise --max_length, or shorten "
                f"that example's answer. Prompt starts: {prompt[:80]!r}"
            )
        if not self._warned:
            logger.warning(f"truncating prompts longer than --max_length {self.max_length} from the left "
                           "(pass --no_truncation to reject such examples instead)")
            self._warned = True
        return prompt_ids[:head] + prompt_ids[head + overflow :]

    @property
    def pad_id(self) -> int:
        """Padding id (many causal LM tokenizers have none: their EOS is masked out anyway)."""
        tok = self.tokenizer
        return next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)

    def label_word_id(self, word: str) -> int:
        """The single token of a masked LM's label word."""
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise DataError(
                f"label word {word!r} is {len(ids)} tokens for this tokenizer; masked LMs score one token at "
                "the mask. Choose single-token label words."
            )
        return ids[0]


def check_examples(samples: Sequence[Sample], encoder: SampleEncoder, split: str, *, generate: bool = False) -> int:
    """Encode every sample once, before training, so that an unusable one stops the run up front.

    An over-long example would otherwise be found only when a batch first holds it: possibly hours
    into the run, after outputs were written. Over-long examples are counted and reported in one
    warning when the encoder truncates, and rejected (naming the first) when it does not. A masked
    LM's label words must each be one token.

    Args:
        samples: the split's samples.
        encoder: the encoder training and evaluation use.
        split: the split's name for messages ("training", "evaluation", ...).
        generate: generation samples are prompted without their answer (evaluation).

    Returns:
        How many samples are longer than ``encoder.max_length`` (and will be truncated).

    Raises:
        DataError: naming the split and the example's position, length and prompt.
    """
    over_long = 0
    for index, sample in enumerate(samples):
        if encoder.masked_lm:
            continuations = [""]
            for candidate in sample.candidates:
                encoder.label_word_id(candidate)
        elif sample.candidates:
            continuations = list(sample.candidates)
        else:
            continuations = [""] if generate else [sample.target]
        too_long = [c for c in continuations if encoder.length(sample.prompt, c) > encoder.max_length]
        over_long += bool(too_long)
        warned, encoder._warned = encoder._warned, True  # one summary warning below, not one per example
        try:
            for continuation in too_long:
                encoder.pair(sample.prompt, continuation)  # raises when it cannot (or may not) be cut
        except DataError as error:
            raise DataError(f"{split} example {index + 1} of {len(samples)}: {error}") from None
        finally:
            encoder._warned = warned
    if over_long:
        logger.warning(f"{over_long} of {len(samples)} {split} examples are longer than --max_length "
                       f"{encoder.max_length} tokens: their prompts are cut from the left (raise --max_length, or "
                       "pass --no_truncation to reject them instead)")
        encoder._warned = True
    return over_long


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def lm_batch(samples: Sequence[Sample], encoder: SampleEncoder) -> dict[str, torch.Tensor]:
    """Causal-LM batch whose ``labels`` cover the target (answer) tokens only."""
    pad = encoder.pad_id
    ids, labels = [], []
    for sample in samples:
        tokens, start = encoder.pair(sample.prompt, sample.target)
        ids.append(tokens)
        labels.append([IGNORE] * start + tokens[start:])
    input_ids = _pad(ids, pad)
    return {"input_ids": input_ids, "attention_mask": _pad([[1] * len(r) for r in ids], 0), "labels": _pad(labels, IGNORE)}


def candidate_batch(samples: Sequence[Sample], encoder: SampleEncoder) -> dict[str, torch.Tensor]:
    """Sequences and scored tokens for ranking each sample's candidates.

    A candidate's score is the mean log-likelihood of its tokens. When every candidate of a
    sample is a single token (verbalizers such as " Yes"/" No"), they are all read off one shared
    row at the prompt's last position: half the forward cost of a row per candidate, same scores.
    Masked LMs read the label words at the mask of one row per sample.

    Keys: ``input_ids``, ``attention_mask``; per scored token ``score_row``, ``score_position``
    (the position whose logits predict it), ``score_token``, ``score_sample``, ``score_slot``;
    ``gold`` per sample; ``score_slots`` (an int): the most candidates a sample has.
    """
    rows: list[list[int]] = []
    entries: list[tuple[int, int, int, int, int]] = []  # (row, position, token, sample, slot)
    for index, sample in enumerate(samples):
        if not sample.candidates:
            raise DataError("a generation sample has no candidates to score: use generation for this task")
        if encoder.masked_lm:
            tokens, _ = encoder.pair(sample.prompt, "")
            mask_at = tokens.index(encoder.tokenizer.mask_token_id)
            entries += [(len(rows), mask_at, encoder.label_word_id(c), index, slot) for slot, c in enumerate(sample.candidates)]
            rows.append(tokens)
            continue
        answers = [encoder.tokenizer(c, add_special_tokens=False)["input_ids"] for c in sample.candidates]
        if all(len(a) == 1 for a in answers):
            tokens, start = encoder.pair(sample.prompt, "")
            entries += [(len(rows), start - 1, a[0], index, slot) for slot, a in enumerate(answers)]
            rows.append(tokens)
            continue
        for slot, candidate in enumerate(sample.candidates):
            tokens, start = encoder.pair(sample.prompt, candidate)
            entries += [(len(rows), p - 1, tokens[p], index, slot) for p in range(start, len(tokens))]
            rows.append(tokens)
    row, position, token, owner, slot = (torch.tensor(column) for column in zip(*entries))
    return {
        "input_ids": _pad(rows, encoder.pad_id),
        "attention_mask": _pad([[1] * len(r) for r in rows], 0),
        "score_row": row, "score_position": position, "score_token": token,
        "score_sample": owner, "score_slot": slot, "score_slots": int(slot.max()) + 1,
        "gold": torch.tensor([s.gold if s.gold is not None else -1 for s in samples]),
    }


def candidate_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean token log-likelihood of each candidate: a (samples × max candidates) tensor, −inf where absent.

    Computed on the device of the logits; each candidate's tokens are averaged by a matmul with a
    0/1 membership matrix (deterministic on CUDA, unlike an accumulating ``index_put_``).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    device = logits.device
    row, position, token, owner, slot = (batch[k].to(device) for k in
                                         ("score_row", "score_position", "score_token", "score_sample", "score_slot"))
    prepended = logits.shape[1] - batch["input_ids"].shape[1]  # prompt tuning's virtual tokens come first
    flat = logits.reshape(-1, logits.shape[-1])
    picked = flat.index_select(0, row * logits.shape[1] + position + prepended).float()
    token_log_probs = F.log_softmax(picked, dim=-1).gather(1, token.unsqueeze(1)).squeeze(1)
    samples, slots = int(batch["gold"].numel()), int(batch["score_slots"])
    cells = owner * slots + slot  # (sample, candidate) of each scored token
    membership = (cells.unsqueeze(0) == torch.arange(samples * slots, device=device).unsqueeze(1)).float()
    totals, counts = membership @ token_log_probs, membership.sum(dim=1)
    scores = torch.where(counts > 0, totals / counts.clamp(min=1), torch.full_like(totals, float("-inf")))
    return scores.view(samples, slots)


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the gold candidate against the others (MeZO's --train_as_classification)."""
    scores = candidate_scores(model, batch)
    return F.cross_entropy(scores, batch["gold"].to(scores.device))

