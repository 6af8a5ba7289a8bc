"""The first-order AdamW column: what the same ZeRO-3 run would hold training with gradients and Adam.

DeepSpeed's own ZeRO-3 model-state estimator
(``estimate_zero3_model_states_mem_needs``: 18 bytes per parameter, 4·largest-layer gather buffer,
×1.5 CPU buffer factor) plus the activations a backward pass keeps (no activation checkpointing).
"""

from __future__ import annotations

from .architectures import Architecture
from .settings import BatchShape, Cluster, Offload, ZeroSettings
from .zo_step import Item, on_device, runtime_items


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


def _hf_lm_head_bytes(arch: Architecture, tokens: int, dtype_bytes: int) -> float:
    """Peak bytes of the LM head and Hugging Face's own loss: the logits, their fp32 upcast
    (if not fp32) and log-softmax's fp32 output, plus the final hidden states."""
    upcast = 4 if dtype_bytes != 4 else 0
    return tokens * arch.vocab * (dtype_bytes + upcast + 4) + tokens * arch.hidden * dtype_bytes


def first_order_items(arch: Architecture, zero: ZeroSettings, cluster: Cluster, batch: BatchShape, device: str,
                      attention: str) -> list[Item]:  # fmt: skip
    """The first-order column's items: DeepSpeed's model-state estimate, backward activations, runtime."""
    cpu_node, gpu = deepspeed_model_states(
        arch.total_params, arch.largest_layer_params, cluster.gpus_per_node, cluster.nodes, zero.offload
    )
    cpu = cpu_node / cluster.gpus_per_node
    items = [Item("model states (DeepSpeed estimator)", gpu=gpu, cpu=0.0 if zero.offload is Offload.NVME else cpu,
                  nvme=cpu if zero.offload is Offload.NVME else 0.0)]  # fmt: skip
    items.append(Item("activations kept for backward", gpu=_backward_activation_bytes(arch, batch, zero.dtype_bytes, attention)))
    items.extend(runtime_items(device, zero.dtype_bytes))
    return [on_device(item, device) for item in items]

