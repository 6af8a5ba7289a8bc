"""The model catalogue: the shape numbers of a decoder-only transformer that decide its memory.

:class:`Architecture` lists every leaf module's parameters; :data:`BUILTIN_MODELS` holds the
published OPT and LLaMA-2 sizes; :func:`load_architecture` also reads a Hugging Face
``config.json`` (a path, its directory, or a hub id: through the Hugging Face cache, or downloaded).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MemoryPlanError


@dataclass(frozen=True)
class Architecture:
    """The shape numbers of a decoder-only transformer that decide its memory.

    Attributes:
        name: a label.
        family: ``"opt"`` (biases, learned positions, ReLU MLP) or ``"llama"`` (no biases, RMSNorm,
            gated SiLU MLP, grouped-query attention).
        hidden, layers, ffn, heads, kv_heads, vocab, max_positions: the usual config numbers.
        tied: whether the LM head shares the input embedding matrix.
    """

    name: str
    family: str
    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        """Width of the K and V projections (heads·head_dim, smaller with grouped-query attention)."""
        return self.kv_heads * (self.hidden // self.heads)

    def modules(self) -> list[tuple[str, int, tuple[tuple[int, ...], ...]]]:
        """(module, how many, shapes of its own parameters) for every leaf module, tied weights once."""
        h, f, v, kv = self.hidden, self.ffn, self.vocab, self.kv_dim
        if self.family == "opt":
            linear = lambda rows, cols: ((rows, cols), (rows,))
            norm = ((h,), (h,))
            layer = [
                ("q_proj", 1, linear(h, h)), ("k_proj", 1, linear(h, h)), ("v_proj", 1, linear(h, h)),
                ("out_proj", 1, linear(h, h)), ("fc1", 1, linear(f, h)), ("fc2", 1, linear(h, f)),
                ("self_attn_layer_norm", 1, norm), ("final_layer_norm", 1, norm),
            ]  # fmt: skip
            outer = [("embed_tokens", 1, ((v, h),)), ("embed_positions", 1, ((self.max_positions + 2, h),)),
                     ("decoder.final_layer_norm", 1, norm)]  # fmt: skip
        else:
            layer = [
                ("q_proj", 1, ((h, h),)), ("k_proj", 1, ((kv, h),)), ("v_proj", 1, ((kv, h),)),
                ("o_proj", 1, ((h, h),)), ("gate_proj", 1, ((f, h),)), ("up_proj", 1, ((f, h),)),
                ("down_proj", 1, ((h, f),)), ("input_layernorm", 1, ((h,),)),
                ("post_attention_layernorm", 1, ((h,),)),
            ]  # fmt: skip
            outer = [("embed_tokens", 1, ((v, h),)), ("norm", 1, ((h,),))]
        if not self.tied:
            outer.append(("lm_head", 1, ((v, h),)))
        return outer + [(f"layers.{name}", self.layers, shapes) for name, _, shapes in layer]

    def shapes(self) -> list[tuple[tuple[int, ...], int]]:
        """(parameter shape, how many) for every distinct parameter."""
        return [(shape, count) for _, count, shapes in self.modules() for shape in shapes]

    @property
    def total_params(self) -> int:
        """Parameters, tied weights counted once."""
        return sum(math.prod(shape) * count for shape, count in self.shapes())

    @property
    def largest_layer_params(self) -> int:
        """Largest leaf module's own parameters (DeepSpeed's ``largest_layer_params``; the tied LM head
        is a module holding the embedding matrix)."""
        return max(sum(math.prod(s) for s in shapes) for _, _, shapes in self.modules())

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        return sum(count * sum(math.prod(s) for s in shapes) // self.layers
                   for name, count, shapes in self.modules() if name.startswith("layers."))  # fmt: skip

    @property
    def largest_leaf_in_layer(self) -> int:
        """Parameters of the largest leaf module of a decoder layer (what ZeRO-3 gathers at once)."""
        return max(sum(math.prod(s) for s in shapes) for name, _, shapes in self.modules() if name.startswith("layers."))

    @property
    def embedding_params(self) -> int:
        """Parameters of the token embedding (and of the LM head, tied or not)."""
        return self.vocab * self.hidden


def _opt(name: str, hidden: int, layers: int, heads: int, ffn: int) -> Architecture:
    return Architecture(name, "opt", hidden, layers, ffn, heads, heads, 50272, 2048, tied=True)


def _llama(name: str, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int) -> Architecture:
    return Architecture(name, "llama", hidden, layers, ffn, heads, kv_heads, 32000, 4096, tied=False)


# The published configs (facebook/opt-*, the OPT paper's table 1 for 175B; meta-llama/Llama-2-*-hf).
BUILTIN_MODELS: dict[str, Architecture] = {
    a.name: a
    for a in (
        _opt("opt-125m", 768, 12, 12, 3072),
        _opt("opt-1.3b", 2048, 24, 32, 8192),
        _opt("opt-13b", 5120, 40, 40, 20480),
        _opt("opt-30b", 7168, 48, 56, 28672),
        _opt("opt-66b", 9216, 64, 72, 36864),
        _opt("opt-175b", 12288, 96, 96, 49152),
        _llama("llama-2-7b", 4096, 32, 32, 32, 11008),
        _llama("llama-2-13b", 5120, 40, 40, 40, 13824),
        _llama("llama-2-70b", 8192, 80, 64, 8, 28672),
    )
}

_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


def load_architecture(model: str | os.PathLike | Architecture) -> Architecture:
    """A built-in model name, a Hugging Face ``config.json`` (or the directory holding it), a hub id
    (its config from the local Hugging Face cache, or downloaded), or an Architecture.

    Raises:
        MemoryPlanError: unknown name, missing file, or a config of an unsupported model type.
    """
    if isinstance(model, Architecture):
        return model
    text = os.fspath(model)
    if text.lower() in BUILTIN_MODELS:
        return BUILTIN_MODELS[text.lower()]
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        if not _looks_like_hub_id(text):
            raise MemoryPlanError(
                f"model {text!r} is neither a built-in model name nor an existing config file or directory. "
                f"Use one of {', '.join(BUILTIN_MODELS)}, the path of a Hugging Face config.json (or of the "
                "directory holding it), or a hub id such as facebook/opt-13b."
            )
        return architecture_from_config(_hub_config(text), source=text)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MemoryPlanError(f"model config {str(path)!r} could not be read as JSON ({e}). Fix or replace the file.") from None
    return architecture_from_config(config, source=str(path))


def _looks_like_hub_id(text: str) -> bool:
    """'org/name': one slash, not a path (absolute, relative, home) and not a .json file name."""
    return text.count("/") == 1 and not text.startswith(("/", ".", "~")) and not text.endswith(".json")


def _hub_config(model_id: str) -> dict[str, Any]:
    """The config.json of hub model ``model_id``, through the Hugging Face cache (and the network if allowed)."""
    from transformers import AutoConfig  # only here: the planner otherwise starts without transformers

    try:
        return AutoConfig.from_pretrained(model_id).to_dict()
    except (OSError, ValueError) as e:
        raise MemoryPlanError(
            f"model {model_id!r} is not a built-in model name or an existing config file or directory, and as a "
            f"hub id its config could not be loaded ({type(e).__name__}: {str(e).splitlines()[0]}). Check the "
            "id, download it first (`hf download ID config.json`) where the hub is reachable, or pass the path of "
            f"its config.json; built-in names: {', '.join(BUILTIN_MODELS)}."
        ) from None


def architecture_from_config(config: Mapping[str, Any], source: str = "the model config") -> Architecture:
    """The Architecture of a Hugging Face config dict (OPT, or LLaMA-like: LLaMA, Mistral, Qwen2)."""
    model_type = config.get("model_type")
    try:
        if model_type == "opt":
            if config.get("word_embed_proj_dim", config["hidden_size"]) != config["hidden_size"]:
                raise MemoryPlanError(
                    f"{source}: OPT with `word_embed_proj_dim` != `hidden_size` (OPT-350m's projections) is not "
                    "modelled. Use another OPT size."
                )
            return Architecture(
                name=str(config.get("_name_or_path") or source), family="opt", hidden=config["hidden_size"],
                layers=config["num_hidden_layers"], ffn=config["ffn_dim"], heads=config["num_attention_heads"],
                kv_heads=config["num_attention_heads"], vocab=config["vocab_size"],
                max_positions=config["max_position_embeddings"], tied=config.get("tie_word_embeddings", True),
            )  # fmt: skip
        if model_type in _LLAMA_LIKE:
            heads = config["num_attention_heads"]
            return Architecture(
                name=str(config.get("_name_or_path") or source), family="llama", hidden=config["hidden_size"],
                layers=config["num_hidden_layers"], ffn=config["intermediate_size"], heads=heads,
                kv_heads=config.get("num_key_value_heads") or heads, vocab=config["vocab_size"],
                max_positions=config.get("max_position_embeddings", 4096),
                tied=config.get("tie_word_embeddings", False),
            )  # fmt: skip
    except KeyError as e:
        raise MemoryPlanError(f"{source}: the key {e.args[0]!r} is missing from this {model_type} config. Add it.") from None
    raise MemoryPlanError(
        f"{source}: `model_type` is {model_type!r}; the planner models \"opt\" and the LLaMA-like types "
        f"{', '.join(repr(t) for t in _LLAMA_LIKE)}. Describe the model with one of those or a built-in name."
    )
