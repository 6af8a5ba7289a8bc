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

from .tasks import DataError, Sample

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
        """Token ids of ``prompt + continuation`` and the index where the continuation starts."""
        if self.masked_lm:
            prompt_ids = self.tokenizer(prompt + self.tokenizer.mask_token, add_special_tokens=True)["input_ids"]
            continuation_ids = []
        else:
            prompt_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            if prompt_ids and prompt_ids[-1] == self.tokenizer.eos_token_id and self.tokenizer.eos_token_id != self.tokenizer.bos_token_id:
                prompt_ids = prompt_ids[:-1]  # tokenizers that append </s> would put it before the answer
            continuation_ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        overflow = len(prompt_ids) + len(continuation_ids) - self.max_length
        if overflow > 0:
            if not self.truncate:
                raise DataError(
                    f"an example is {len(prompt_ids) + len(continuation_ids)} tokens, over --max_length "
                    f"{self.max_length}: raise --max_length or allow truncation. Prompt starts: {prompt[:80]!r}"
                )
            if not self._warned:
                logger.warning(f"truncating prompts longer than --max_length {self.max_length} from the left")
                self._warned = True
            keep_head = 1 if prompt_ids and prompt_ids[0] == self.tokenizer.bos_token_id else 0
            prompt_ids = prompt_ids[:keep_head] + prompt_ids[keep_head + overflow :]
        return prompt_ids + continuation_ids, len(prompt_ids)

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
    """All (sample, candidate) sequences of ``samples``, for scoring or the classification loss.

    Keys: ``input_ids``, ``attention_mask``, ``score_mask`` (tokens whose log-likelihood is
    averaged; for masked LMs the mask position), ``candidate_ids`` (masked LMs: label-word id per
    row), ``owner`` (sample index per row), ``slot`` (candidate index per row), ``gold``.
    """
    pad = encoder.pad_id
    ids, score_masks, owners, slots, word_ids = [], [], [], [], []
    for index, sample in enumerate(samples):
        if not sample.candidates:
            raise DataError("a generation sample has no candidates to score: use generation for this task")
        for slot, candidate in enumerate(sample.candidates):
            tokens, start = encoder.pair(sample.prompt, candidate)
            if encoder.masked_lm:
                mask_at = tokens.index(encoder.tokenizer.mask_token_id)
                score_masks.append([int(i == mask_at) for i in range(len(tokens))])
                word_ids.append(encoder.label_word_id(candidate))
            else:
                score_masks.append([0] * start + [1] * (len(tokens) - start))
            ids.append(tokens)
            owners.append(index)
            slots.append(slot)
    batch = {
        "input_ids": _pad(ids, pad),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0),
        "score_mask": _pad(score_masks, 0),
        "owner": torch.tensor(owners),
        "slot": torch.tensor(slots),
        "gold": torch.tensor([s.gold if s.gold is not None else -1 for s in samples]),
    }
    if encoder.masked_lm:
        batch["candidate_ids"] = torch.tensor(word_ids)
    return batch


def candidate_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean token log-likelihood of each candidate: a (samples × max candidates) tensor, −inf where absent."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["score_mask"]
    if "candidate_ids" in batch:  # masked LM: log p(label word | mask)
        log_probs = F.log_softmax(logits, dim=-1)
        at_mask = (log_probs * mask.unsqueeze(-1)).sum(dim=1)
        per_row = at_mask.gather(1, batch["candidate_ids"].unsqueeze(1)).squeeze(1)
    else:  # causal LM: token t is predicted by position t - 1
        log_probs = F.log_softmax(logits[:, :-1], dim=-1)
        token_log_probs = log_probs.gather(2, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
        target_mask = mask[:, 1:].float()
        per_row = (token_log_probs * target_mask).sum(1) / target_mask.sum(1).clamp(min=1)
    samples = int(batch["gold"].numel())
    width = int(batch["slot"].max()) + 1
    scores = torch.full((samples, width), float("-inf"))
    scores[batch["owner"], batch["slot"]] = per_row
    return scores


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the gold candidate against the others (MeZO's --train_as_classification)."""
    return F.cross_entropy(candidate_scores(model, batch), batch["gold"])


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Language-model loss on the answer tokens only."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
