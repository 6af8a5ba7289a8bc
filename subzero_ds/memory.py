"""Memory planner: per-rank bytes on GPU, CPU and NVMe of a ZO run under ZeRO-3, before launching it.

    subzero-memory --model opt-13b --config ds_configs/zero3_subzero_bf16.json \\
        --nodes 2 --gpus-per-node 8 --gpu-memory-gib 80 --cpu-memory-gib 1024 --batch-size 4 --seq-len 512
    subzero-memory --table            # the published prediction table (BENCHMARKS.md)

What a rank holds during a ZO step (no gradients, no optimizer state):

- **parameter shards**: ceil(numel / world) elements of every parameter in the parameter dtype, on
  the GPU, or in CPU memory (``offload_param: cpu``), or on NVMe (``offload_param: nvme``, with
  DeepSpeed's pinned swap buffers in CPU memory);
- **persistent parameters**: parameters with numel <= ``stage3_param_persistence_threshold`` (biases,
  norms) stay gathered, whole, on the GPU after the first forward;
- **gathered working set**: the module being computed, gathered whole. With prefetching on, every
  fetch prefetches up to another ``stage3_prefetch_bucket_size`` elements of the modules to come,
  until ``stage3_max_live_parameters`` are gathered: the look-ahead grows to min(max_live, the rest
  of the model). Each coalesced all-gather also holds one flat staging buffer of its bucket while
  its parameters are copied out. A tied embedding that the LM head reuses within
  ``stage3_max_reuse_distance`` elements stays gathered for the whole forward;
- **activations**, inference style: nothing outlives its layer, so the peak is the larger of a
  decoder layer's working set and the LM head + loss (the logits over the vocabulary; the loss
  upcasts and log-softmaxes them a chunk of rows at a time; the LM head's weight is released
  before the loss). Fused mode runs one forward over the doubled batch [B; B]: activations
  double, each side path accumulates x·V·(C·Uᵀ) into its Linear's output in place (holding x·V
  and, in half precision, an fp32 chunk of the input; the LM head computes and scores its logits a
  chunk of rows at a time), and the right factors C·Uᵀ of every
  trainable matrix are built for the whole step;
- **in-place backup** (not in fused mode): a copy of this rank's trainable shard in the parameter
  dtype for exact restore, plus a whole copy of every persistent trainable parameter; it lives
  where the shards live (CPU memory under NVMe offload: DeepSpeed does not swap it);
- **direction factors**: SubZero keeps U (m×r), Vᵀ (r×n) and the step's μZVᵀ (r×n) in fp32 for
  every trainable matrix, r·(m+2n)·4 bytes; MeZO nothing (its direction is generated and applied
  in one kernel pass over the shard, as SubZero's is from those factors). They live with the
  shards (in-place) or on the GPU (fused: the rank-r side path runs inside the forward);
- **runtime**: a fixed allowance per process (CUDA context and communication buffers on GPU; the
  Python/torch/DeepSpeed process on CPU). With ``device="cpu"`` (validation on a CPU-only
  machine) every GPU byte lives in host RAM and the runtime item is the measured fixed cost of a
  ZeRO-3 process above its imports.

The first-order AdamW column uses DeepSpeed's own ZeRO-3 model-state estimator
(``estimate_zero3_model_states_mem_needs``: 18 bytes per parameter, 4·largest-layer gather buffer,
×1.5 CPU buffer factor) plus the activations a backward pass keeps (no activation checkpointing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

GiB = 2**30

# Chunk sizes of subzero_ds.seeds and subzero_ds.loss, repeated here so the planner does not
# import torch (tests/unit/test_memory.py checks they agree).
LOSS_CHUNK_ELEMENTS = 1 << 22
SIDE_PATH_UPCAST_ELEMENTS = 1 << 22  # subzero_ds.fused.UPCAST_CHUNK_ELEMENTS

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# DeepSpeed ZeRO-3 defaults (deepspeed/runtime/zero/config.py, offload_config.py).
DEFAULT_PREFETCH_BUCKET = 50_000_000
DEFAULT_MAX_LIVE = 1_000_000_000
DEFAULT_MAX_REUSE = 1_000_000_000
DEFAULT_PERSISTENCE = 100_000
DEFAULT_NVME_BUFFER_COUNT = 5
DEFAULT_NVME_BUFFER_SIZE = 100_000_000

# Fixed per-process allowances (see the module docstring and BENCHMARKS.md).
CUDA_RUNTIME_BYTES = 1 * GiB  # CUDA context + NCCL buffers + caching-allocator slack, per GPU rank
CPU_PROCESS_BYTES = 1 * GiB  # a Python process with torch, transformers and DeepSpeed imported
# On a CPU-only run the "GPU" is host RAM and the CPU process is the validation baseline (RSS after
# the imports); what remains is the process group (gloo, DeepSpeed's shared-memory all-reduce
# buffers) and the engine's bookkeeping, per parameter width: measured above the imports with a
# 2K-parameter model (`bench/memory_check.py --models opt-tiny`, bench/results/memory_check_fixed_cost.md).
CPU_DEVICE_RUNTIME_BYTES = {4: 24 * 2**20, 2: 32 * 2**20}


class MemoryPlanError(ValueError):
    """A user-fixable problem in what was given to the memory planner (names the value and the fix)."""


class Offload(str, Enum):
    """Where ZeRO-3 keeps the parameter shards (``zero_optimization.offload_param.device``)."""

    NONE = "none"
    CPU = "cpu"
    NVME = "nvme"


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Settings: ZeRO config, cluster, batch
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroSettings:
    """What the planner reads from a DeepSpeed config (stage 3) and its ``"subzero"`` section."""

    precision: str = "bf16"
    offload: Offload = Offload.NONE
    prefetch_bucket: int = DEFAULT_PREFETCH_BUCKET
    max_live: int = DEFAULT_MAX_LIVE
    max_reuse: int = DEFAULT_MAX_REUSE
    persistence_threshold: int = DEFAULT_PERSISTENCE
    nvme_buffer_count: int = DEFAULT_NVME_BUFFER_COUNT
    nvme_buffer_size: int = DEFAULT_NVME_BUFFER_SIZE
    method: str = "subzero"
    rank: int = 24
    fused: bool = False
    update: str = "sgd"

    @property
    def dtype_bytes(self) -> int:
        """Bytes of one parameter (and activation) element."""
        return DTYPE_BYTES[self.precision]


def load_zero_settings(config: str | os.PathLike | Mapping[str, Any]) -> ZeroSettings:
    """Read a DeepSpeed config (JSON path or dict) into :class:`ZeroSettings`.

    Raises:
        MemoryPlanError: missing/invalid file, or a stage other than 3.
        subzero_ds.config.ConfigError: a bad ``"subzero"`` section or DeepSpeed setting (every problem listed).
    """
    from .config import ConfigError, load_ds_config, parse

    source = "the DeepSpeed config dict" if isinstance(config, Mapping) else repr(os.fspath(config))
    try:
        ds = load_ds_config(config)
    except ConfigError as e:
        raise MemoryPlanError(str(e)) from None
    settings, deepspeed = parse(ds, source)
    if deepspeed.stage != 3:
        raise MemoryPlanError(
            f"{source}: `zero_optimization.stage` is {deepspeed.stage!r}; the planner models ZeRO-3 "
            "(partitioned parameters). Set it to 3."
        )
    return ZeroSettings(
        precision=deepspeed.precision.value, offload=Offload(deepspeed.offload_device),
        prefetch_bucket=deepspeed.prefetch_bucket_size, max_live=deepspeed.max_live_parameters,
        max_reuse=deepspeed.max_reuse_distance, persistence_threshold=deepspeed.persistence_threshold,
        nvme_buffer_count=deepspeed.nvme_buffer_count, nvme_buffer_size=deepspeed.nvme_buffer_size,
        method=settings.method, rank=getattr(settings.options, "rank", 24), fused=settings.fused, update=settings.update,
    )


@dataclass(frozen=True)
class Cluster:
    """The machines: ``nodes`` × ``gpus_per_node`` ranks; memory per GPU and per node, in GiB."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    cpu_memory_gib: float = 1024.0
    nvme_gib: float | None = None  # per node; None: not checked

    @property
    def world(self) -> int:
        """Number of ranks."""
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class BatchShape:
    """This rank's micro-batch: rows × tokens."""

    batch_size: int = 1
    seq_len: int = 512


def _check_positive(**values: float) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
            raise MemoryPlanError(f"`{key}` is {value!r}; it must be a finite number > 0. Pass a positive value.")


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One line of the estimate: bytes per rank on each tier."""

    name: str
    gpu: float = 0.0
    cpu: float = 0.0
    nvme: float = 0.0


@dataclass
class Estimate:
    """Per-rank memory of a ZO step (``items``) and of first-order AdamW (``first_order``).

    Attributes:
        fits / first_order_fits: whether GPU, CPU (per node) and NVMe (per node) suffice.
        peak_moment: the point of the forward where the GPU peak is reached.
        advice: what to change when the ZO run does not fit (empty when it fits).
    """

    architecture: Architecture
    zero: ZeroSettings
    cluster: Cluster
    batch: BatchShape
    device: str
    items: list[Item]
    first_order: list[Item]
    peak_moment: str
    fits: bool = False
    first_order_fits: bool = False
    problems: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    @staticmethod
    def _sum(items: list[Item], tier: str) -> float:
        return sum(getattr(item, tier) for item in items)

    def total(self, tier: str, first_order: bool = False) -> float:
        """Bytes per rank on ``tier`` ("gpu", "cpu" or "nvme")."""
        return self._sum(self.first_order if first_order else self.items, tier)

    @property
    def host_total(self) -> float:
        """GPU + CPU bytes per rank: what a CPU-only run holds in host RAM (validation)."""
        return self.total("gpu") + self.total("cpu")

    def report(self) -> str:
        """The itemised table, the verdict and the advice, as text."""
        a, z, c, b = self.architecture, self.zero, self.cluster, self.batch
        mode = "fused [B;B]" if z.fused else "in-place"
        lines = [
            f"Model {a.name}: {a.total_params / 1e9:.3f}B parameters ({a.family}, hidden {a.hidden}, {a.layers} layers, "
            f"ffn {a.ffn}, {a.heads} heads, vocab {a.vocab}, {'tied' if a.tied else 'untied'} embeddings)",
            f"ZeRO-3, {z.precision}, offload_param={z.offload.value}, {z.method} (rank {z.rank}), {mode}; "
            f"{c.nodes} node(s) × {c.gpus_per_node} GPU(s) = {c.world} ranks; batch {b.batch_size} × {b.seq_len} "
            f"tokens per rank; device={self.device}",
            "",
            f"{'per rank, GiB':<52}{'GPU':>9}{'CPU':>9}{'NVMe':>9}",
        ]
        for item in self.items:
            lines.append(f"  {item.name:<50}{item.gpu / GiB:>9.2f}{item.cpu / GiB:>9.2f}{item.nvme / GiB:>9.2f}")
        lines.append(f"  {'ZO total':<50}" + "".join(f"{self.total(t) / GiB:>9.2f}" for t in ("gpu", "cpu", "nvme")))
        lines.append(f"  (GPU peak reached at: {self.peak_moment})")
        lines.append("")
        lines.append("first-order AdamW, same ZeRO-3 setting (DeepSpeed's model-state estimate + backward activations):")
        for item in self.first_order:
            lines.append(f"  {item.name:<50}{item.gpu / GiB:>9.2f}{item.cpu / GiB:>9.2f}{item.nvme / GiB:>9.2f}")
        lines.append(
            f"  {'AdamW total':<50}" + "".join(f"{self.total(t, True) / GiB:>9.2f}" for t in ("gpu", "cpu", "nvme"))
        )
        lines.append("")
        capacity = f"{c.gpu_memory_gib:g} GiB per GPU, {c.cpu_memory_gib:g} GiB CPU per node" + (
            f", {c.nvme_gib:g} GiB NVMe per node" if c.nvme_gib is not None else ""
        )
        lines.append(f"ZO: {'fits' if self.fits else 'does NOT fit'} ({capacity}).")
        lines.extend(f"  - {p}" for p in self.problems)
        if self.advice:
            lines.append("To make it fit:")
            lines.extend(f"  - {a}" for a in self.advice)
        lines.append(f"First-order AdamW: {'fits' if self.first_order_fits else 'does not fit'}.")
        return "\n".join(lines)


def _shard_elements(arch: Architecture, world: int) -> int:
    """Elements per rank of all shards (every parameter padded to a multiple of the world size)."""
    return sum(math.ceil(math.prod(shape) / world) * count for shape, count in arch.shapes())


def _persistent_elements(arch: Architecture, threshold: int) -> int:
    return sum(math.prod(shape) * count for shape, count in arch.shapes() if math.prod(shape) <= threshold)


def _layer_activation_elements(arch: Architecture, tokens: int, batch: BatchShape, attention: str) -> float:
    """Peak elements alive inside one decoder layer during a no-grad forward of ``tokens`` tokens.

    Attention: residual, norm output, q, k, v, rotated/scaled copies of q and k, attention output,
    output projection (+ scores and probabilities, B·heads·S² each, with eager attention).
    MLP: residual, norm output, output, and the ffn-wide tensors alive together (OPT: fc1 output and
    its ReLU; LLaMA: SiLU(gate), up, their product).
    """
    h, kv, f = arch.hidden, arch.kv_dim, arch.ffn
    attn = tokens * (6 * h + 3 * kv)
    if attention == "eager":
        rows = tokens // batch.seq_len
        attn += 2 * rows * arch.heads * batch.seq_len**2
    mlp = tokens * (3 * h + (2 if arch.family == "opt" else 3) * f)
    return max(attn, mlp)


def _lm_head_bytes(arch: Architecture, tokens: int, dtype_bytes: int, rank: int, fused: bool = False) -> float:
    """Peak bytes of the LM head and the ZO loss over ``tokens`` tokens (the doubled batch when fused).

    In place: the logits in the model dtype and the final hidden states; the loss
    (``subzero_ds.loss``) upcasts and log-softmaxes one chunk of rows at a time. Fused: the LM
    head computes, side-paths and scores its logits a chunk of rows at a time inside its forward
    (``FusedPass.language_model_losses``), so only the hidden states and one chunk's logits exist.
    """
    hidden = tokens * arch.hidden * dtype_bytes
    logits = tokens * arch.vocab
    if fused:
        chunk_rows = min(tokens // 2, max(1, LOSS_CHUNK_ELEMENTS // arch.vocab))
        side_path = chunk_rows * rank * 4 + _upcast_chunk_bytes(dtype_bytes, chunk_rows * arch.hidden)
        return hidden + chunk_rows * arch.vocab * dtype_bytes + _loss_chunk_bytes(chunk_rows * arch.vocab) + side_path
    return logits * dtype_bytes + hidden + _loss_chunk_bytes(logits)


def _loss_chunk_bytes(elements: int) -> int:
    """One chunk's fp32 upcast and log-softmax (``subzero_ds.loss``), at most the whole logits."""
    return 2 * min(elements, LOSS_CHUNK_ELEMENTS) * 4


def _upcast_chunk_bytes(dtype_bytes: int, elements: int) -> int:
    """The fused side path upcasts a half-precision layer input (``elements``) a chunk of rows at a time."""
    return 0 if dtype_bytes == 4 else min(elements, SIDE_PATH_UPCAST_ELEMENTS) * 4


def _hf_lm_head_bytes(arch: Architecture, tokens: int, dtype_bytes: int) -> float:
    """Peak bytes of the LM head and Hugging Face's own loss: the logits, their fp32 upcast
    (if not fp32) and log-softmax's fp32 output, plus the final hidden states."""
    upcast = 4 if dtype_bytes != 4 else 0
    return tokens * arch.vocab * (dtype_bytes + upcast + 4) + tokens * arch.hidden * dtype_bytes


def _direction_bytes(arch: Architecture, zero: ZeroSettings) -> float:
    """SubZero's factors of every trainable matrix in bytes, fp32.

    The kernels generate and apply a direction in one pass over the shard, with no buffer beside it.
    SubZero keeps per matrix U (m×r), Vᵀ (r×n) for the window and the step's μZ·Vᵀ (r×n), shared
    by the step's passes.
    """
    if zero.method != "subzero":
        return 0.0
    bases = 0.0
    for shape, count in arch.shapes():
        if len(shape) != 2:
            continue
        m, n = shape
        r = min(zero.rank, m, n)
        bases += count * r * (m + 2 * n) * 4
    return bases


def estimate(
    model: str | os.PathLike | Architecture,
    zero_config: str | os.PathLike | Mapping[str, Any] | ZeroSettings,
    cluster: Cluster = Cluster(),
    batch: BatchShape = BatchShape(),
    device: str = "cuda",
    attention: str = "sdpa",
) -> Estimate:
    """Per-rank memory of a ZO step under ZeRO-3, itemised, with a first-order AdamW comparison.

    Args:
        model: a built-in name (``BUILTIN_MODELS``), a config.json path or directory, or an Architecture.
        zero_config: a DeepSpeed JSON path or dict (stage 3, with a ``"subzero"`` section), or ZeroSettings.
        cluster: nodes, GPUs per node, GPU memory, CPU memory per node (GiB).
        batch: this rank's micro-batch (rows × tokens).
        device: ``"cuda"``, or ``"cpu"`` for a CPU-only run where "GPU" bytes live in host RAM
            (all of them are then reported in the CPU column).
        attention: ``"sdpa"`` (fused kernels: no S×S scores materialised) or ``"eager"``.

    Returns:
        The :class:`Estimate`; ``fits`` and ``advice`` say whether and how it fits.

    Raises:
        MemoryPlanError: an unknown model, missing file or bad number (names the value and the fix).
    """
    arch = load_architecture(model)
    zero = zero_config if isinstance(zero_config, ZeroSettings) else load_zero_settings(zero_config)
    _check_positive(
        nodes=cluster.nodes, gpus_per_node=cluster.gpus_per_node, gpu_memory_gib=cluster.gpu_memory_gib,
        cpu_memory_gib=cluster.cpu_memory_gib, batch_size=batch.batch_size, seq_len=batch.seq_len,
    )  # fmt: skip
    for key in ("nodes", "gpus_per_node"):
        if int(getattr(cluster, key)) != getattr(cluster, key):
            raise MemoryPlanError(f"`{key}` is {getattr(cluster, key)!r}; it must be a whole number. Pass an integer.")
    if device not in ("cuda", "cpu"):
        raise MemoryPlanError(f"`device` is {device!r}; use \"cuda\" (GPUs) or \"cpu\" (a CPU-only validation run).")
    if attention not in ("sdpa", "eager"):
        raise MemoryPlanError(f"`attention` is {attention!r}; use \"sdpa\" or \"eager\".")
    if zero.fused and zero.method != "subzero":
        raise MemoryPlanError(
            "`subzero.fused` is true with `subzero.method` \"mezo\": the fused ± pass needs a low-rank direction. "
            "Set `method` to \"subzero\" or `fused` to false."
        )
    if batch.seq_len > arch.max_positions:
        raise MemoryPlanError(
            f"`seq_len` is {batch.seq_len}, longer than {arch.name}'s {arch.max_positions} positions. Use a shorter sequence."
        )
    items = _zo_items(arch, zero, cluster, batch, device, attention)
    first_order = _first_order_items(arch, zero, cluster, batch, device, attention)
    result = Estimate(arch, zero, cluster, batch, device, items[0], first_order, peak_moment=items[1])
    result.problems = _capacity_problems(result, first_order=False)
    result.fits = not result.problems
    result.first_order_fits = not _capacity_problems(result, first_order=True)
    if not result.fits:
        result.advice = _advice(result, attention)
    return result


def _zo_items(arch: Architecture, zero: ZeroSettings, cluster: Cluster, batch: BatchShape, device: str,
              attention: str) -> tuple[list[Item], str]:  # fmt: skip
    world, p = cluster.world, zero.dtype_bytes
    shard = _shard_elements(arch, world) * p
    persistent = _persistent_elements(arch, zero.persistence_threshold) * p
    on_shard_tier = {Offload.NONE: "gpu", Offload.CPU: "cpu", Offload.NVME: "nvme"}[zero.offload]
    items: list[Item] = [Item("parameter shards", **{on_shard_tier: shard})]
    if zero.offload is Offload.NVME:
        items.append(Item("NVMe swap buffers (pinned)", cpu=zero.nvme_buffer_count * zero.nvme_buffer_size * p))
    if not zero.fused:
        backup_tier = "cpu" if zero.offload is Offload.NVME else on_shard_tier
        backup = _shard_elements(arch, world) * p + persistent  # shard copy + whole persistent copies
        items.append(Item("in-place backup of the trainable shard", **{backup_tier: backup}))
    items.append(Item("persistent parameters (gathered)", gpu=persistent))

    # Gathered working set at the two candidate peaks of the forward.
    tokens = batch.batch_size * batch.seq_len * (2 if zero.fused else 1)
    held = arch.embedding_params if arch.tied and arch.total_params - arch.embedding_params < zero.max_reuse else 0
    leaf = arch.largest_leaf_in_layer
    if zero.prefetch_bucket > 0:
        # Every fetch prefetches up to another bucket of upcoming parameters, until max_live are
        # available: early in the forward the look-ahead is min(max_live, the rest of the model).
        layer_gathered = min(arch.total_params - persistent // p, zero.max_live + leaf)
    else:
        layer_gathered = leaf + held
    # A coalesced all-gather lands in one flat buffer of the whole bucket; each parameter is then
    # copied out of it (torch.cat), and the buffer lives until the bucket's last parameter is used.
    # The first bucket starts with the embedding, so a model smaller than a bucket is staged whole
    # (measured: OPT-40M peaks in decoder layer 0 with the whole model gathered and staged).
    stream = arch.total_params - persistent // p
    staging = min(zero.prefetch_bucket + leaf, stream) if zero.prefetch_bucket else leaf
    layer_gathered += staging
    layer_act = _layer_activation_elements(arch, tokens, batch, attention) * p
    if zero.fused:
        # A Linear's side path: x·V (tokens × r, fp32), accumulated into the output in place.
        layer_act += tokens * zero.rank * 4 + _upcast_chunk_bytes(p, tokens * arch.ffn)
    # The LM head. In place, its weight is gathered for the matmul and released by DeepSpeed's
    # post-forward hook (the trace's last use) before the loss. Fused, the loss runs inside its
    # forward, with the weight gathered, a chunk of rows at a time.
    if zero.fused:
        head_gathered, head_act = arch.embedding_params * p, _lm_head_bytes(arch, tokens, p, zero.rank, fused=True)
    else:
        matmul = (arch.embedding_params * p, tokens * (arch.vocab + arch.hidden) * p)
        after = (0, _lm_head_bytes(arch, tokens, p, zero.rank))
        head_gathered, head_act = max(matmul, after, key=sum)
    if layer_gathered * p + layer_act >= head_gathered + head_act:
        moment, gathered, act = "a decoder layer", layer_gathered * p, layer_act
        gathered_name = ("gathered module + prefetch look-ahead" if zero.prefetch_bucket > 0 else "gathered module") + (
            " + held tied embedding" if held and not zero.prefetch_bucket else "")
    else:
        moment, gathered, act = "the LM head and loss", head_gathered, head_act
        gathered_name = "gathered LM head weight" + ("" if head_gathered else " (released before the loss)")
    batch_note = f" ({'2×' if zero.fused else ''}{batch.batch_size}×{batch.seq_len} tokens)"
    items.append(Item(gathered_name, gpu=gathered))
    items.append(Item("forward activations, peak" + batch_note, gpu=act))

    bases = _direction_bytes(arch, zero)
    direction_tier = "gpu" if zero.fused or zero.offload is Offload.NONE else "cpu"
    if bases:
        items.append(Item(f"SubZero U, Vᵀ bases and μZVᵀ (fp32, r={zero.rank})", **{direction_tier: bases}))
    if zero.fused:
        # Entering the fused pass builds every served module's right factor C·Uᵀ (r × rows, fp32) at once.
        factors = sum(count * min(zero.rank, *shape) * shape[0] * 4 for shape, count in arch.shapes() if len(shape) == 2)
        items.append(Item("fused side-path factors C·Uᵀ (fp32)", gpu=factors))
    label, state = _method_state(arch, zero, world)
    if state:
        items.append(Item(label, **{"cpu" if zero.offload is not Offload.NONE else "gpu": state}))
    items.extend(_runtime_items(device, p))
    return [_on_device(item, device) for item in items], moment


# Chunks of z, √H·z, ĝ and Adam's step that HiZOO/S-MeZO/Adam make at a time (subzero_ds.methods).
METHOD_CHUNK_ELEMENTS = 1 << 22


def _method_state(arch: Architecture, zero: ZeroSettings, world: int) -> tuple[str, float]:
    """(label, bytes per rank) of the method's state: fp32 and sharded like the parameters (on the
    shards' device), except SubZero's matrices, whose momentum/Adam state is r×r per matrix."""
    per_element = {"momentum": 1, "adam": 2}.get(zero.update, 0) + (1 if zero.method == "hizoo" else 0)
    if not per_element:
        return "", 0.0
    matrices = [(shape, count) for shape, count in arch.shapes() if len(shape) == 2]
    if zero.method == "subzero":
        full = sum(count * math.prod(shape) for shape, count in arch.shapes() if len(shape) != 2)
        coordinates = sum(count * min(zero.rank, *shape) ** 2 for shape, count in matrices)
        state = (math.ceil(full / world) + coordinates) * 4 * per_element
        where = "r×r per matrix, full for biases and norms"
    else:
        state = _shard_elements(arch, world) * 4 * per_element
        where = "sharded like the parameters"
    kinds = {"momentum": "momentum", "adam": "Adam m, v"}.get(zero.update, "")
    if zero.method == "hizoo":
        kinds = "HiZOO's Hessian H" + (f" + {kinds}" if kinds else "")
    chunks = METHOD_CHUNK_ELEMENTS * 4 * 2 if zero.update == "adam" or zero.method == "hizoo" else 0
    return f"method state: {kinds} (fp32, {where}) + working chunks", state + chunks


def _runtime_items(device: str, dtype_bytes: int) -> list[Item]:
    if device == "cpu":
        return [Item("runtime (process group, engine)", cpu=CPU_DEVICE_RUNTIME_BYTES[dtype_bytes])]
    return [Item("runtime (CUDA context, NCCL; Python process)", gpu=CUDA_RUNTIME_BYTES, cpu=CPU_PROCESS_BYTES)]


def _on_device(item: Item, device: str) -> Item:
    """On a CPU-only run the "GPU" is host RAM: fold the GPU column into the CPU column."""
    return replace(item, gpu=0.0, cpu=item.cpu + item.gpu) if device == "cpu" else item


def deepspeed_model_states(total_params: int, largest_layer_params: int, gpus_per_node: int, nodes: int,
                           offload: Offload, buffer_factor: float = 1.5) -> tuple[int, int]:  # fmt: skip
    """(CPU bytes per node, GPU bytes per GPU) of ZeRO-3 first-order model states, as DeepSpeed estimates them.

    The formulas of ``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`` with
    ``zero_init=True``: 18 bytes per parameter (fp16/bf16 params and grads, fp32 master, Adam m, v, +2
    of buffers) sharded over all GPUs, a 4·largest-layer gather buffer on the GPU, and a ×1.5 buffer
    factor on CPU. ``offload`` NONE: all on GPU; CPU: optimizer and parameters offloaded
    (``offload_optimizer`` + ``offload_param`` cpu); NVME: as CPU (the estimator has no NVMe case).
    """
    total_gpus, per_node = nodes * gpus_per_node, 1 / nodes
    largest = 4 * largest_layer_params
    if offload is Offload.NONE:
        return int(largest_layer_params * 4 * gpus_per_node * buffer_factor), int(largest + int(18 * total_params / total_gpus))
    return int(total_params * 18 * per_node * buffer_factor), int(largest)


def _backward_activation_bytes(arch: Architecture, batch: BatchShape, dtype_bytes: int, attention: str) -> float:
    """Activations a training forward keeps for backward (all layers, no checkpointing) + the LM head's.

    Per token and layer: residual and norm inputs (2h), attention's q, k, v and output (2h + 2kv), the
    MLP's norm output (h) and ffn-wide inputs of the backward (OPT: fc1 out, ReLU out; LLaMA: gate, up,
    SiLU, product), and with eager attention the scores and probabilities (2·heads·S). Dropout masks
    are not counted. The LM head keeps the logits and the fp32 log-softmax.
    """
    h, kv, f = arch.hidden, arch.kv_dim, arch.ffn
    tokens = batch.batch_size * batch.seq_len
    per_token = 2 * h + 2 * h + 2 * kv + h + (2 if arch.family == "opt" else 4) * f
    if attention == "eager":
        per_token += 2 * arch.heads * batch.seq_len
    return arch.layers * tokens * per_token * dtype_bytes + _hf_lm_head_bytes(arch, tokens, dtype_bytes)


def _first_order_items(arch: Architecture, zero: ZeroSettings, cluster: Cluster, batch: BatchShape, device: str,
                       attention: str) -> list[Item]:  # fmt: skip
    cpu_node, gpu = deepspeed_model_states(
        arch.total_params, arch.largest_layer_params, cluster.gpus_per_node, cluster.nodes, zero.offload
    )
    cpu = cpu_node / cluster.gpus_per_node
    items = [Item("model states (DeepSpeed estimator)", gpu=gpu, cpu=0.0 if zero.offload is Offload.NVME else cpu,
                  nvme=cpu if zero.offload is Offload.NVME else 0.0)]  # fmt: skip
    items.append(Item("activations kept for backward", gpu=_backward_activation_bytes(arch, batch, zero.dtype_bytes, attention)))
    items.extend(_runtime_items(device, zero.dtype_bytes))
    return [_on_device(item, device) for item in items]


def _capacity_problems(result: Estimate, first_order: bool) -> list[str]:
    c = result.cluster
    gpu, cpu, nvme = (result.total(t, first_order) for t in ("gpu", "cpu", "nvme"))
    problems = []
    if result.device == "cpu":
        node = cpu * c.gpus_per_node
        if node > c.cpu_memory_gib * GiB:
            problems.append(f"host RAM: {node / GiB:.1f} GiB per node needed, {c.cpu_memory_gib:g} GiB available")
        return problems
    if gpu > c.gpu_memory_gib * GiB:
        problems.append(f"GPU: {gpu / GiB:.1f} GiB per rank needed, {c.gpu_memory_gib:g} GiB available")
    if cpu * c.gpus_per_node > c.cpu_memory_gib * GiB:
        problems.append(
            f"CPU: {cpu * c.gpus_per_node / GiB:.1f} GiB per node needed ({c.gpus_per_node} ranks), "
            f"{c.cpu_memory_gib:g} GiB available"
        )
    if c.nvme_gib is not None and nvme * c.gpus_per_node > c.nvme_gib * GiB:
        problems.append(f"NVMe: {nvme * c.gpus_per_node / GiB:.1f} GiB per node needed, {c.nvme_gib:g} GiB available")
    return problems


def _advice(result: Estimate, attention: str) -> list[str]:
    """Changes that make the ZO run fit, each checked by re-estimating (most local change first)."""
    arch, zero, cluster, batch, device = result.architecture, result.zero, result.cluster, result.batch, result.device

    def fits(z: ZeroSettings = zero, c: Cluster = cluster, b: BatchShape = batch) -> bool:
        items, moment = _zo_items(arch, z, c, b, device, attention)
        return not _capacity_problems(Estimate(arch, z, c, b, device, items, [], moment), first_order=False)

    advice = []
    if zero.method == "subzero":
        flipped = replace(zero, fused=not zero.fused)
        if fits(flipped):
            advice.append(
                f"set `subzero.fused` to {str(not zero.fused).lower()} "
                + ("(no backup copy; activations double)" if not zero.fused else "(activations halve; adds a backup copy)")
            )
    for target in (Offload.CPU, Offload.NVME):
        if zero.offload is not target and fits(replace(zero, offload=target)):
            advice.append(f"offload the parameters: `zero_optimization.offload_param.device` = \"{target.value}\"")
    if zero.prefetch_bucket and fits(replace(zero, prefetch_bucket=0)):
        advice.append("set `zero_optimization.stage3_prefetch_bucket_size` to 0 (slower: no prefetch)")
    rows = batch.batch_size // 2
    while rows >= 1:
        if fits(b=replace(batch, batch_size=rows)):
            advice.append(f"lower the per-device batch to {rows} (same global batch: more ranks or more steps)")
            break
        rows //= 2
    nodes = cluster.nodes * 2
    while nodes <= 1024:
        if fits(c=replace(cluster, nodes=nodes)):
            advice.append(f"use {nodes} nodes ({nodes * cluster.gpus_per_node} ranks) instead of {cluster.nodes}")
            break
        nodes *= 2
    if not advice:
        advice.append(
            "no single change above suffices: combine offload, a smaller batch and more nodes, or use PEFT "
            "(LoRA) so that only adapters are trained"
        )
    return advice


# ---------------------------------------------------------------------------------------------
# The published table
# ---------------------------------------------------------------------------------------------

TABLE_MODELS = ("opt-13b", "opt-30b", "opt-66b", "opt-175b", "llama-2-70b")
TABLE_NODES = (1, 2, 4, 8)


def prediction_table(batch: BatchShape = BatchShape(4, 512), precision: str = "bf16", gpu_gib: float = 80.0,
                     cpu_gib: float = 1024.0, gpus_per_node: int = 8, rank: int = 24) -> str:  # fmt: skip
    """Markdown: GPU GiB per rank (CPU GiB per node) for ZO in-place, ZO fused and AdamW, ✗ where it does not fit."""
    lines = [
        f"Per-rank GPU GiB / per-node CPU GiB; {gpus_per_node} × {gpu_gib:g} GiB GPUs and {cpu_gib:g} GiB CPU per node; "
        f"{precision}, batch {batch.batch_size} × {batch.seq_len} tokens per GPU, SubZero rank {rank}, SDPA, ZeRO-3 "
        "defaults (prefetch 5e7, persistence 1e5). ✗ = does not fit.",
        "",
        "| model | params | nodes | offload | ZO in-place | ZO fused | AdamW (first-order) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in TABLE_MODELS:
        arch = BUILTIN_MODELS[name]
        for nodes in TABLE_NODES:
            cluster = Cluster(nodes, gpus_per_node, gpu_gib, cpu_gib)
            for offload in (Offload.NONE, Offload.CPU):
                cells = []
                for fused in (False, True):
                    settings = ZeroSettings(precision=precision, offload=offload, rank=rank, fused=fused)
                    e = estimate(arch, settings, cluster, batch)
                    cells.append(_cell(e.total("gpu"), e.total("cpu") * gpus_per_node, e.fits))
                cells.append(_cell(e.total("gpu", True), e.total("cpu", True) * gpus_per_node, e.first_order_fits))
                lines.append(f"| {name} | {arch.total_params / 1e9:.1f}B | {nodes} | {offload.value} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(gpu: float, cpu_node: float, fits: bool) -> str:
    return f"{gpu / GiB:,.1f} / {cpu_node / GiB:,.0f}" + ("" if fits else " ✗")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subzero-memory",
        description="Predict per-rank GPU/CPU/NVMe memory of a SubZero/MeZO ZeRO-3 run (and of first-order AdamW).",
    )
    parser.add_argument("--model", help=f"built-in name ({', '.join(BUILTIN_MODELS)}), a config.json path/directory, or a hub id "
                        "(e.g. facebook/opt-13b; its config through the Hugging Face cache)")
    parser.add_argument("--config", help="DeepSpeed JSON config (ZeRO stage 3, with a \"subzero\" section)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--cpu-memory-gib", type=float, default=1024.0, help="CPU memory per node")
    parser.add_argument("--nvme-gib", type=float, default=None, help="NVMe per node (unchecked if absent)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per rank (micro-batch; 1, or 4 with --table)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    parser.add_argument("--precision", choices=list(DTYPE_BYTES), help="override the config's precision")
    parser.add_argument("--offload", choices=[o.value for o in Offload], help="override offload_param.device")
    parser.add_argument("--fused", choices=["on", "off"], help="override subzero.fused")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a CPU-only run (GPU bytes live in host RAM; used for validation)")
    parser.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--table", action="store_true",
                        help="print the published prediction table (uses --gpus-per-node, --gpu-memory-gib, "
                             "--cpu-memory-gib, --batch-size, --seq-len, --precision) and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``subzero-memory``; exit status 2 on a user mistake (message, no traceback)."""
    from .config import ConfigError

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.table:
            batch = BatchShape(4 if args.batch_size is None else args.batch_size, args.seq_len)
            _check_positive(gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gib,
                            cpu_memory_gib=args.cpu_memory_gib, batch_size=batch.batch_size, seq_len=batch.seq_len)  # fmt: skip
            print(prediction_table(batch, args.precision or "bf16", args.gpu_memory_gib, args.cpu_memory_gib,
                                   args.gpus_per_node), end="")  # fmt: skip
            return 0
        if not args.model or not args.config:
            raise MemoryPlanError(
                "both `--model` and `--config` are needed (or `--table`). Example: subzero-memory --model opt-13b "
                "--config ds_configs/zero3_subzero_bf16.json --nodes 2"
            )
        arch = load_architecture(args.model)  # the model's error first: it is the first argument
        zero = load_zero_settings(args.config)
        overrides: dict[str, Any] = {}
        if args.precision:
            overrides["precision"] = args.precision
        if args.offload:
            overrides["offload"] = Offload(args.offload)
        if args.fused:
            overrides["fused"] = args.fused == "on"
        cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gib, args.cpu_memory_gib, args.nvme_gib)
        result = estimate(arch, replace(zero, **overrides), cluster, BatchShape(1 if args.batch_size is None else args.batch_size, args.seq_len),
                          device=args.device, attention=args.attention)  # fmt: skip
    except (MemoryPlanError, ConfigError) as error:
        print(f"subzero-memory: error: {error}", file=sys.stderr)
        return 2
    print(result.report())
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
