"""What a rank holds during one ZO step under ZeRO-3 (no gradients, no optimizer state), item by item.

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
- **hpZ secondary copy** (ZeRO++, ``zero_hpz_partition_size`` = K > 1): besides its 1/N shard,
  every rank keeps a 1/K slice of the model, so that a group of K ranks (a node) holds it whole and
  each forward after the first gathers inside the group. DeepSpeed allocates it on the shards'
  device (``_partition_param_sec``: GPU, or CPU memory under CPU offload). In place, the forwards
  read only the secondary copy, so probes perturb it alone and exact restore backs it up (another
  1/K) instead of the shard (1/N less);
- **direction factors**: a method whose matrix directions live in a rank-r subspace
  (``MethodSpec.subspace_rank``: SubZero) keeps U (m×r), Vᵀ (r×n) and the step's μZVᵀ (r×n) in fp32
  for every trainable matrix, r·(m+2n)·4 bytes; MeZO nothing (its direction is generated and
  applied in one kernel pass over the shard, as SubZero's is from those factors). They live with
  the shards (in-place) or on the GPU (fused: the rank-r side path runs inside the forward);
- **method state**: the fp32 bytes per trainable element that the method's and the update rule's
  registered specs declare (``state_bytes_per_element``: HiZOO's Hessian, momentum, Adam's m and
  v), sharded like the parameters, except that a subspace method's update-rule state is r×r per
  matrix; plus the scratch their writes allocate per chunk (``working_chunk_bytes``). It lives on
  the shards' device (CPU memory under NVMe offload);
- **runtime**: a fixed allowance per process (CUDA context and communication buffers on GPU; the
  Python/torch/DeepSpeed process on CPU). With ``device="cpu"`` (validation on a CPU-only
  machine) every GPU byte lives in host RAM and the runtime item is the measured fixed cost of a
  ZeRO-3 process above its imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..methods.registry import MethodSpec
from .architectures import Architecture
from .settings import GiB, BatchShape, Cluster, Offload, ZeroSettings

# Chunk sizes of subzero_ds.loss and subzero_ds.fused, repeated here so the planner does not import
# the training code (the fused pass imports transformers); tests/memory/test_memory.py checks they agree.
LOSS_CHUNK_ELEMENTS = 1 << 22
SIDE_PATH_UPCAST_ELEMENTS = 1 << 22  # subzero_ds.fused.UPCAST_CHUNK_ELEMENTS

# Fixed per-process allowances (the module docstring's **runtime**; BENCHMARKS.md).
CUDA_RUNTIME_BYTES = 1 * GiB  # CUDA context + NCCL buffers + caching-allocator slack, per GPU rank
CPU_PROCESS_BYTES = 1 * GiB  # a Python process with torch, transformers and DeepSpeed imported
# On a CPU-only run the "GPU" is host RAM and the CPU process is the validation baseline (RSS after
# the imports); what remains is the process group (gloo, DeepSpeed's shared-memory all-reduce
# buffers) and the engine's bookkeeping, per parameter width: measured above the imports with a
# 2K-parameter model (`bench/memory_check.py --models opt-tiny`, bench/results/memory_check_fixed_cost.md).
CPU_DEVICE_RUNTIME_BYTES = {4: 24 * 2**20, 2: 32 * 2**20}


@dataclass(frozen=True)
class Item:
    """One line of the estimate: bytes per rank on each tier."""

    name: str
    gpu: float = 0.0
    cpu: float = 0.0
    nvme: float = 0.0


def shard_elements(arch: Architecture, world: int) -> int:
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


def _lm_head_bytes(arch: Architecture, tokens: int, dtype_bytes: int, rank: int | None, fused: bool = False) -> float:
    """Peak bytes of the LM head and the ZO loss over ``tokens`` tokens (the doubled batch when fused).

    In place: the logits in the model dtype and the final hidden states; the loss
    (``subzero_ds.loss``) upcasts and log-softmaxes one chunk of rows at a time. Fused: the LM
    head computes, side-paths and scores its logits a chunk of rows at a time inside its forward
    (``FusedPass.language_model_losses``), so only the hidden states and one chunk's logits exist
    (and its rank-``rank`` side path).
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


def _direction_bytes(arch: Architecture, zero: ZeroSettings) -> float:
    """A subspace method's factors of every trainable matrix in bytes, fp32 (0 for other methods).

    The kernels generate and apply a direction in one pass over the shard, with no buffer beside it.
    A method with a ``subspace_rank`` (SubZero) keeps per matrix U (m×r), Vᵀ (r×n) for the window
    and the step's μZ·Vᵀ (r×n), shared by the step's passes.
    """
    rank = zero.subspace_rank
    if rank is None:
        return 0.0
    bases = 0.0
    for shape, count in arch.shapes():
        if len(shape) != 2:
            continue
        m, n = shape
        r = min(rank, m, n)
        bases += count * r * (m + 2 * n) * 4
    return bases


def zo_items(arch: Architecture, zero: ZeroSettings, cluster: Cluster, batch: BatchShape, device: str,
             attention: str) -> tuple[list[Item], str]:  # fmt: skip
    world, p, rank = cluster.world, zero.dtype_bytes, zero.subspace_rank
    shard = shard_elements(arch, world) * p
    persistent = _persistent_elements(arch, zero.persistence_threshold) * p
    on_shard_tier = {Offload.NONE: "gpu", Offload.CPU: "cpu", Offload.NVME: "nvme"}[zero.offload]
    items: list[Item] = [Item("parameter shards", **{on_shard_tier: shard})]
    if zero.offload is Offload.NVME:
        items.append(Item("NVMe swap buffers (pinned)", cpu=zero.nvme_buffer_count * zero.nvme_buffer_size * p))
    if not zero.fused:
        backup_tier = "cpu" if zero.offload is Offload.NVME else on_shard_tier
        if zero.hpz_group(world) > 1:  # probes leave the shards at θ: forwards read the secondary copy
            items.append(Item("in-place backup of the persistent parameters", **{backup_tier: persistent}))
        else:  # shard copy + whole persistent copies
            backup = shard_elements(arch, world) * p + persistent
            items.append(Item("in-place backup of the trainable shard", **{backup_tier: backup}))
    items.extend(_hpz_items(arch, zero, world, on_shard_tier))
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
        layer_act += tokens * rank * 4 + _upcast_chunk_bytes(p, tokens * arch.ffn)
    # The LM head. In place, its weight is gathered for the matmul and released by DeepSpeed's
    # post-forward hook (the trace's last use) before the loss. Fused, the loss runs inside its
    # forward, with the weight gathered, a chunk of rows at a time.
    if zero.fused:
        head_gathered, head_act = arch.embedding_params * p, _lm_head_bytes(arch, tokens, p, rank, fused=True)
    else:
        matmul = (arch.embedding_params * p, tokens * (arch.vocab + arch.hidden) * p)
        after = (0, _lm_head_bytes(arch, tokens, p, rank))
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
        items.append(Item(f"{_title(zero.method_spec)} U, Vᵀ bases and μZVᵀ (fp32, r={rank})", **{direction_tier: bases}))
    if zero.fused:
        # Entering the fused pass builds every served module's right factor C·Uᵀ (r × rows, fp32) at once.
        factors = sum(count * min(rank, *shape) * shape[0] * 4 for shape, count in arch.shapes() if len(shape) == 2)
        items.append(Item("fused side-path factors C·Uᵀ (fp32)", gpu=factors))
    label, state = _method_state(arch, zero, world)
    if state:
        items.append(Item(label, **{"cpu" if zero.offload is not Offload.NONE else "gpu": state}))
    items.extend(runtime_items(device, p))
    return [on_device(item, device) for item in items], moment


def _hpz_items(arch: Architecture, zero: ZeroSettings, world: int, tier: str) -> list[Item]:
    """ZeRO++ hpZ's secondary copy, 1/K of the model per rank (and its in-place backup); none with hpZ off."""
    group = zero.hpz_group(world)
    if group == 1:
        return []
    secondary = shard_elements(arch, group) * zero.dtype_bytes
    items = [Item(f"hpZ secondary copy (1/{group} of the model)", **{tier: secondary})]
    if not zero.fused:
        items.append(Item("in-place backup of the hpZ secondary copy", **{tier: secondary}))
    return items


def _method_state(arch: Architecture, zero: ZeroSettings, world: int) -> tuple[str, float]:
    """(label, bytes per rank) of the method's and the update rule's state, as their specs declare it.

    Both are fp32 and sharded like the parameters (on the shards' device), except the update rule's
    state of a subspace method's matrices, which is r×r per matrix; their working chunks are added.
    Under hpZ the update rule keeps its parameter-sized state for the secondary range (1/K) too.
    """
    method, update, rank = zero.method_spec, zero.update_spec, zero.subspace_rank
    shard = shard_elements(arch, world)
    group = zero.hpz_group(world)
    copies = [world] if group == 1 else [world, group]  # the ranges the update rule keeps state for
    state, chunks = shard * method.state_bytes_per_element, method.working_chunk_bytes
    where, kinds = "sharded like the parameters", []
    if method.state_bytes_per_element:
        kinds.append(f"{_title(method)}'s {method.state_name or 'state'}")
    if update is not None:  # None: the method brings its own update rule, whose state is the method's
        chunks += update.working_chunk_bytes
        if update.state_bytes_per_element:
            kinds.append(update.state_name or f"{update.name} state")
        if rank is not None and update.state_bytes_per_element:
            full = sum(count * math.prod(shape) for shape, count in arch.shapes() if len(shape) != 2)
            coordinates = sum(count * min(rank, *shape) ** 2 for shape, count in arch.shapes() if len(shape) == 2)
            state += (sum(math.ceil(full / ranks) for ranks in copies) + coordinates) * update.state_bytes_per_element
            where = "r×r per matrix, full for biases and norms"
        else:
            state += sum(shard_elements(arch, ranks) for ranks in copies) * update.state_bytes_per_element
    if not state + chunks:
        return "", 0.0
    return f"method state: {' + '.join(kinds) or 'none'} (fp32, {where}) + working chunks", state + chunks


def _title(method: MethodSpec) -> str:
    """The method's name in prose ("SubZero"), as its spec gives it."""
    return method.title or method.name


def runtime_items(device: str, dtype_bytes: int) -> list[Item]:
    """The fixed per-process allowance (the CPU-only validation baseline's on ``device="cpu"``)."""
    if device == "cpu":
        return [Item("runtime (process group, engine)", cpu=CPU_DEVICE_RUNTIME_BYTES[dtype_bytes])]
    return [Item("runtime (CUDA context, NCCL; Python process)", gpu=CUDA_RUNTIME_BYTES, cpu=CPU_PROCESS_BYTES)]


def on_device(item: Item, device: str) -> Item:
    """On a CPU-only run the "GPU" is host RAM: fold the GPU column into the CPU column."""
    return replace(item, gpu=0.0, cpu=item.cpu + item.gpu) if device == "cpu" else item

