"""The chunked language-model loss equals the model's own loss and never upcasts the whole logits."""

from types import SimpleNamespace

import pytest
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BatchEncoding, Gemma2Config, Gemma2ForCausalLM, RobertaConfig, RobertaForMaskedLM

from subzero_ds import loss as loss_module
from helpers.tiny import VOCAB, pattern_batch, tiny_model
from subzero_ds.loss import computes_language_model_loss, language_model_loss, model_loss, scoring_head


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


class LargestVocabularyOutput(TorchDispatchMode):
    """Records the most rows of any new tensor an op produces with the vocabulary as its last dimension
    (views of existing tensors, such as the head's transposed weight, are not new memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in (out if isinstance(out, (tuple, list)) else [out]):
            if (isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[-1] == VOCAB
                    and tensor.untyped_storage().data_ptr() not in inputs):
                self.rows = max(self.rows, tensor.numel() // VOCAB)
        return out


@pytest.mark.parametrize("arch", ["opt", "llama", "gpt2"])
def test_the_logits_never_exist_whole(arch, small_chunks):
    """The loss is scored inside the LM head: at most one chunk of rows of logits (5 here) at a time, and the
    model's forward returns none; 48 rows would exist whole with Hugging Face's loss."""
    model = tiny_model(arch).eval()
    batch = with_ignored_labels(pattern_batch(4, seq_len=12))
    with torch.no_grad():
        expected = model(**batch).loss
        with LargestVocabularyOutput() as recorder:
            ours = language_model_loss(model, batch)
    assert recorder.rows == 5
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_a_model_that_transforms_its_logits_is_scored_from_them():
    """Gemma-2 softcaps its logits after the head: scoring inside the head would miss that, so its loss comes
    from the logits (still a chunk of rows at a time)."""
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=2.0)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    assert scoring_head(model) is None and scoring_head(tiny_model("llama")) is not None
    batch = with_ignored_labels(pattern_batch(2, seq_len=10))
    with torch.no_grad():
        torch.testing.assert_close(language_model_loss(model, batch), model(**batch).loss, rtol=1e-6, atol=1e-6)


def test_the_language_model_losses_say_so_and_others_do_not():
    """The fused pass takes its LM-head path for loss functions that declare they are the LM loss."""
    from subzero_ds.tasks.encoding import classification_loss

    assert computes_language_model_loss(language_model_loss) and computes_language_model_loss(model_loss)
    assert not computes_language_model_loss(classification_loss)
    assert not computes_language_model_loss(lambda model, batch: model(**batch).loss)
