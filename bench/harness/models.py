"""The model shapes the benchmarks build (random weights, partitioned by ZeRO-3 at construction) and random batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.integrations import HfDeepSpeedConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelShape:
    """A model family and shape to build with random weights."""

    label: str
    model_class: type[PreTrainedModel]
    config: Callable[[], PretrainedConfig]


def opt_shape(hidden: int, layers: int, heads: int, project: int | None = None, ffn: int | None = None,
              vocab: int = 50272) -> Callable[[], OPTConfig]:
    """An OPT shape (by default OPT's vocabulary of 50272 and ffn 4 × hidden; 2048 positions), no KV cache."""
    return lambda: OPTConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn or 4 * hidden,
        num_attention_heads=heads, max_position_embeddings=2048, word_embed_proj_dim=project or hidden, use_cache=False,
    )  # fmt: skip


def _llama_134m() -> LlamaConfig:
    """LLaMA-shaped, close to OPT-125M in size: hidden 768, 12 layers, 12 heads, SwiGLU 2048, vocab 32000, untied."""
    return LlamaConfig(
        vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
        intermediate_size=2048, max_position_embeddings=2048, tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip


MODELS: dict[str, ModelShape] = {
    "opt": ModelShape("OPT-125M shape (hidden 768, 12 layers, ffn 3072, vocab 50272, tied)", OPTForCausalLM, opt_shape(768, 12, 12)),
    "llama": ModelShape("LLaMA shape (hidden 768, 12 layers, SwiGLU 2048, vocab 32000, untied)", LlamaForCausalLM, _llama_134m),
    "opt-tiny": ModelShape("OPT shape, hidden 64, 2 layers (smoke tests)", OPTForCausalLM, opt_shape(64, 2, 2)),
    "opt-7m": ModelShape("OPT shape, hidden 128, 4 layers", OPTForCausalLM, opt_shape(128, 4, 4)),
    "opt-30m": ModelShape("OPT shape, hidden 384, 6 layers", OPTForCausalLM, opt_shape(384, 6, 6)),
    "opt-350m": ModelShape("OPT-350M shape (hidden 1024, 24 layers, projections 512)", OPTForCausalLM, opt_shape(1024, 24, 16, 512)),
    "opt-1.3b": ModelShape("OPT-1.3B shape (hidden 2048, 24 layers, ffn 8192, vocab 50272, tied)", OPTForCausalLM, opt_shape(2048, 24, 32)),
}  # fmt: skip


def build_partitioned(model_class: type[PreTrainedModel], config: PretrainedConfig, ds_config: dict,
                      dtype: torch.dtype) -> PreTrainedModel:
    """The model with random weights in ``dtype``, partitioned by ZeRO-3 as it is created (``ds_config``'s
    ``zero_optimization``: never whole on a rank), SDPA attention, dropout off (eval mode)."""
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 - alive while the model is created: ZeRO-3 init
    return model_class._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


def random_batch(batch_size: int, seq_len: int, vocab: int, seed: int) -> Batch:
    """Random token ids (this rank's micro-batch), full attention mask, labels = inputs."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
