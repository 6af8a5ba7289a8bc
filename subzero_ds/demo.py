"""Tiny models and a synthetic task, built offline, for the README's demo, the tests and benchmarks.

``tiny_model("opt")`` / ``tiny_model("llama")`` are real ``transformers`` models (OPT and LLaMA
code paths) with 2 layers and width 64; the same seed gives the same weights in every process.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedModel

VOCAB = 96


def tiny_config(arch: str, hidden: int = 64, layers: int = 2, vocab: int = VOCAB):
    """A small OPT or LLaMA config (SDPA attention, no KV cache needed)."""
    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden,
            num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=hidden,
            dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}: use 'opt' or 'llama'")


def tiny_model(arch: str = "opt", seed: int = 0, **sizes: int) -> PreTrainedModel:
    """A freshly initialised tiny causal LM; identical for identical (arch, seed, sizes)."""
    config = tiny_config(arch, **sizes)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model_class = OPTForCausalLM if arch == "opt" else LlamaForCausalLM
        return model_class(config).float()


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
