"""The chunked language-model loss equals the model's own loss and never upcasts the whole logits."""

from types import SimpleNamespace

import pytest
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model
from transformers import BatchEncoding, RobertaConfig, RobertaForMaskedLM

from subzero_ds import loss as loss_module
from helpers.tiny import VOCAB, pattern_batch, tiny_model
from subzero_ds.loss import model_loss


def with_ignored_labels(batch):
    labels = batch["labels"].clone()
    labels[0, :5] = -100  # e.g. a prompt that is not scored
    labels[1, -3:] = -100  # and padding
    return {**batch, "labels": labels}


def tiny_masked_lm():
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=64)
    return RobertaForMaskedLM(config).eval()


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 rows, so every batch here is split unevenly into many."""
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 5 * VOCAB)


@pytest.mark.parametrize("make_model", [lambda: tiny_model("opt"), lambda: tiny_model("llama"), tiny_masked_lm],
                         ids=["opt", "llama", "roberta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_the_models_own_loss(make_model, dtype, small_chunks):
    model = make_model().to(dtype).eval()
    batch = with_ignored_labels(pattern_batch(4, seq_len=12))
    with torch.no_grad():
        output = model(**batch)
        ours = model_loss(model, batch)
    # Hugging Face's loss functions upcast the logits; RoBERTa's own forward does not (bf16 loss).
    expected = model.loss_function(logits=output.logits, labels=batch["labels"], vocab_size=VOCAB)
    if dtype == torch.float32:
        torch.testing.assert_close(output.loss, expected, rtol=1e-6, atol=1e-6)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_prompt_tuning_loss_skips_the_virtual_tokens(small_chunks):
    model = get_peft_model(tiny_model("llama"), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3))
    batch = with_ignored_labels(pattern_batch(2, seq_len=10))
    with torch.no_grad():
        expected = model(**batch).loss
        ours = model_loss(model, batch)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("container", [dict, BatchEncoding], ids=["dict", "BatchEncoding"])
def test_the_loss_upcasts_one_chunk_of_rows_at_a_time(container, small_chunks, monkeypatch):
    seen_rows = []
    cross_entropy = torch.nn.functional.cross_entropy

    def recording(logits, *args, **kwargs):
        seen_rows.append(logits.shape[0])
        return cross_entropy(logits, *args, **kwargs)

    monkeypatch.setattr(loss_module.F, "cross_entropy", recording)
    with torch.no_grad():
        model_loss(tiny_model("opt").to(torch.bfloat16), container(pattern_batch(4, seq_len=12)))
    assert seen_rows == [5] * 9 + [3]  # 48 rows


def test_a_model_without_a_language_model_loss_returns_its_own():
    class Scorer(torch.nn.Module):
        def forward(self, x, labels):
            return SimpleNamespace(loss=(x - labels).square().mean())

    assert model_loss(Scorer(), {"x": torch.ones(3), "labels": torch.zeros(3)}).item() == 1.0
