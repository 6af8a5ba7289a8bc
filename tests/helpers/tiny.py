"""Tiny models, tokenizers and a synthetic task, built offline, for the tests and benchmarks (not shipped).

``tiny_model(arch)`` builds a real ``transformers`` causal LM of one of :data:`ARCHITECTURES` (OPT,
LLaMA, GPT-2, Mistral and Qwen2 code paths) with 2 layers and width 64; the same seed gives the same
weights in every process.
"""

from __future__ import annotations

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, OPTConfig, OPTForCausalLM, PretrainedConfig, PreTrainedModel, Qwen2Config,
                          Qwen2ForCausalLM)

VOCAB = 96
# The tiny causal LMs tiny_model builds: OPT (learned positions, biases, LayerNorm), LLaMA (RoPE, RMSNorm,
# grouped-query attention), GPT-2 (Conv1D layers, weight in×out; tied LM head), Mistral (LLaMA-like with
# sliding-window attention), Qwen2 (q/k/v biases; tied LM head, as its small checkpoints).
ARCHITECTURES = ("opt", "llama", "gpt2", "mistral", "qwen2")
_MODEL_CLASSES = {"opt": OPTForCausalLM, "llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel,
                  "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}


def tiny_config(arch: str, hidden: int = 64, layers: int = 2, vocab: int = VOCAB) -> PretrainedConfig:
    """A small config of one of :data:`ARCHITECTURES` (SDPA attention, no KV cache needed)."""
    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden,
            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=hidden,
            dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        )
    if arch == "mistral":
        return MistralConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=8,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")


def tiny_model(arch: str = "opt", seed: int = 0, **sizes: int) -> PreTrainedModel:
    """A freshly initialised tiny causal LM; identical for identical (arch, seed, sizes)."""
    config = tiny_config(arch, **sizes)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _MODEL_CLASSES[arch](config).float()


def pattern_batch(batch_size: int, seq_len: int = 16, vocab: int = VOCAB, seed: int = 0) -> dict[str, torch.Tensor]:
    """Sequences counting up by a per-row stride mod ``vocab``: an easy-to-learn next-token task."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(3, vocab, (batch_size, 1), generator=generator)
    strides = torch.randint(1, 3, (batch_size, 1), generator=generator)
    input_ids = 3 + (starts + strides * torch.arange(seq_len)) % (vocab - 3)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def rank_slice(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's equal share of a global batch (data parallelism)."""
    size = next(iter(batch.values())).shape[0]
    if size % world_size:
        raise ValueError(f"global batch of {size} rows does not split evenly over {world_size} ranks")
    share = size // world_size
    return {k: v[rank * share : (rank + 1) * share] for k, v in batch.items()}


def tiny_tokenizer(texts: list[str], vocab_size: int = 384, masked_lm: bool = False):
    """A byte-level BPE tokenizer trained on ``texts`` in a second (GPT-2 style; RoBERTa style if masked)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    template = "<s> $A </s>" if masked_lm else "<s> $A"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>")


def save_tiny_pretrained(directory, arch: str, texts: list[str], seed: int = 0, **sizes: int) -> None:
    """Write a tiny model (one of :data:`ARCHITECTURES`, or ``roberta``) and its tokenizer with ``save_pretrained``.

    ``sizes`` (``hidden``, ``layers``) go to :func:`tiny_config` for the causal LMs.
    """
    from transformers import RobertaConfig, RobertaForMaskedLM

    tokenizer = tiny_tokenizer(texts, masked_lm=arch == "roberta")
    vocab = len(tokenizer)
    if arch == "roberta":
        config = RobertaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=514, pad_token_id=1,
                               bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = RobertaForMaskedLM(config)
    else:
        model = tiny_model(arch, seed=seed, vocab=vocab, **sizes)
        model.config.update({"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2})
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
