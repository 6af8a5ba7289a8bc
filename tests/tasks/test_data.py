"""Batches and scores: candidate log-likelihoods against a hand computation on a tiny model."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from subzero_ds.tasks.encoding import SampleEncoder, candidate_batch, candidate_scores, classification_loss, lm_batch
from helpers.tiny import save_tiny_pretrained
from subzero_ds.tasks import DataError, Sample

TEXTS = ["the movie was great", "the movie was terrible", "a fine film", "it was bad and boring"] * 20
SAMPLES = [
    Sample(prompt="the movie was", candidates=(" great", " terrible"), gold=0),
    Sample(prompt="a fine film, it was", candidates=(" bad", " great", " fine"), gold=2),
]


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_tiny_pretrained(path, "llama", TEXTS)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    path = tmp_path_factory.mktemp("roberta")
    save_tiny_pretrained(path, "roberta", TEXTS)
    return AutoModelForMaskedLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def by_hand(model, tokenizer, prompt: str, candidate: str) -> float:
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        log_probs = F.log_softmax(model(ids).logits[0].float(), dim=-1)
    total = sum(log_probs[len(prompt_ids) + i - 1, token].item() for i, token in enumerate(answer_ids))
    return total / len(answer_ids)


def test_candidate_scores_are_mean_token_log_likelihoods(causal):
    model, tokenizer = causal
    encoder = SampleEncoder(tokenizer, max_length=64)
    with torch.no_grad():
        scores = candidate_scores(model, candidate_batch(SAMPLES, encoder))
    assert scores.shape == (2, 3)
    assert scores[0, 2].item() == float("-inf")  # the first sample has only two candidates
    for row, sample in enumerate(SAMPLES):
        for slot, candidate in enumerate(sample.candidates):
            assert scores[row, slot].item() == pytest.approx(by_hand(model, tokenizer, sample.prompt, candidate), abs=1e-5)


def test_classification_loss_is_cross_entropy_over_candidates(causal):
    model, tokenizer = causal
    batch = candidate_batch(SAMPLES, SampleEncoder(tokenizer, max_length=64))
    with torch.no_grad():
        scores = candidate_scores(model, batch)
        loss = classification_loss(model, batch)
    expected = -(F.log_softmax(scores[0, :2], 0)[0] + F.log_softmax(scores[1], 0)[2]) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_lm_batch_trains_on_the_answer_tokens_only(causal):
    _, tokenizer = causal
    batch = lm_batch(SAMPLES, SampleEncoder(tokenizer, max_length=64))
    for row, sample in enumerate(SAMPLES):
        answer = tokenizer(sample.target, add_special_tokens=False)["input_ids"]
        labels = [t for t in batch["labels"][row].tolist() if t != -100]
        assert labels == answer
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, length - len(answer) : length].tolist() == answer


def test_masked_lm_scores_the_label_word_at_the_mask(masked):
    model, tokenizer = masked
    encoder = SampleEncoder(tokenizer, max_length=64, masked_lm=True)
    sample = Sample(prompt="the movie was", candidates=(" great", " terrible"), gold=0)
    ids = tokenizer(sample.prompt + tokenizer.mask_token)["input_ids"]
    mask_at = ids.index(tokenizer.mask_token_id)
    with torch.no_grad():
        scores = candidate_scores(model, candidate_batch([sample], encoder))
        log_probs = F.log_softmax(model(torch.tensor([ids])).logits[0, mask_at], dim=-1)
    for slot, word in enumerate(sample.candidates):
        (word_id,) = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert scores[0, slot].item() == pytest.approx(log_probs[word_id].item(), abs=1e-5)


def test_masked_lm_rejects_multi_token_label_words(masked):
    _, tokenizer = masked
    encoder = SampleEncoder(tokenizer, max_length=64, masked_lm=True)
    with pytest.raises(DataError, match="label word ' antidisestablishment' is"):
        candidate_batch([Sample(prompt="x", candidates=(" antidisestablishment", " great"), gold=0)], encoder)


def test_over_long_prompts_are_cut_from_the_left_or_rejected(causal):
    _, tokenizer = causal
    long = Sample(prompt="the movie was great " * 40 + "and the end was", candidates=(" great",), gold=0)
    batch = lm_batch([long], SampleEncoder(tokenizer, max_length=32))
    assert batch["input_ids"].shape[1] == 32
    assert batch["input_ids"][0, 0].item() == tokenizer.bos_token_id  # the start token survives
    answer = tokenizer(" great", add_special_tokens=False)["input_ids"]
    assert [t for t in batch["labels"][0].tolist() if t != -100] == answer
    with pytest.raises(DataError, match="over --max_length 32"):
        lm_batch([long], SampleEncoder(tokenizer, max_length=32, truncate=False))


def test_single_token_candidates_share_one_row_and_long_ones_get_their_own(causal):
    model, tokenizer = causal
    encoder = SampleEncoder(tokenizer, max_length=64)
    short = Sample(prompt="the movie was", candidates=(" great", " terrible"), gold=0)
    long = Sample(prompt="the movie was", candidates=(" great", " antidisestablishment"), gold=1)
    assert all(len(tokenizer(c, add_special_tokens=False)["input_ids"]) == 1 for c in short.candidates)
    assert len(tokenizer(" antidisestablishment", add_special_tokens=False)["input_ids"]) > 1
    batch = candidate_batch([short, long], encoder)
    assert batch["input_ids"].shape[0] == 1 + 2
    with torch.no_grad():
        scores = candidate_scores(model, batch)
    for row, sample in enumerate([short, long]):
        for slot, candidate in enumerate(sample.candidates):
            assert scores[row, slot].item() == pytest.approx(by_hand(model, tokenizer, sample.prompt, candidate), abs=1e-5)
