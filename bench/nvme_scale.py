"""ZO steps on a model bigger than this machine's memory: OPT-shaped, bf16, parameters on NVMe.

    mkdir -p /work/nvme && deepspeed --num_gpus 2 bench/nvme_scale.py --size 13b --nvme_path /work/nvme

The model is built directly into ZeRO-3 partitions (``deepspeed.zero.Init`` with
``offload_param.device = "nvme"``): every module is created, partitioned and its partitions
written to the swap files as it is constructed, so it is never whole in memory. Random weights
(seeded N(0, 0.02) written shard by shard; norms 1, biases 0). Then ``--steps`` fused SubZero
steps, each: one forward over [B; B] (every layer swapped in from NVMe and gathered once), one
all-reduce of (ℓ+, ℓ−), and the update (each shard swapped in, edited, written back).

Reports per step (rank 0 prints a table; ``--output``, default bench/results/nvme_scale_<size>.md):
seconds, bytes read from / written to storage by each rank (/proc/self/io, which counts the
O_DIRECT reads of DeepSpeed's async I/O), peak RSS per rank, and the machine's total RAM.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time
from pathlib import Path

import psutil
import torch

import subzero_ds
from subzero_ds.distributed import all_gather_objects, exit_process, get_world_size_and_rank, init_distributed
from subzero_ds.zero.shards import collect_shards

# hidden, layers, heads, ffn (the published OPT shapes; vocab 50272, 2048 positions)
OPT_SHAPES = {"125m": (768, 12, 12, 3072), "1.3b": (2048, 24, 32, 8192), "2.7b": (2560, 32, 32, 10240),
              "6.7b": (4096, 32, 32, 16384), "13b": (5120, 40, 40, 20480), "30b": (7168, 48, 56, 28672)}
VOCAB = 50272


def opt_config(size: str):
    from transformers import OPTConfig

    hidden, layers, heads, ffn = OPT_SHAPES[size]
    return OPTConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     ffn_dim=ffn, max_position_embeddings=2048, word_embed_proj_dim=hidden, dropout=0.0,
                     attention_dropout=0.0, activation_dropout=0.0, enable_bias=True, use_cache=False)


def ds_config(nvme_path: str, largest_partition: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 100_000,
            "stage3_prefetch_bucket_size": 0,  # no prefetch: at most the working layer is swapped in
            "stage3_max_live_parameters": largest_partition,
            "offload_param": {"device": "nvme", "nvme_path": nvme_path, "pin_memory": False, "buffer_count": 6,
                              "buffer_size": largest_partition},
        },
        "aio": {"block_size": 1 << 20, "queue_depth": 16, "intra_op_parallelism": 1, "single_submit": False,
                "overlap_events": True},
        "subzero": {"method": "subzero", "lr": 1e-7, "eps": 1e-3, "rank": 24, "subspace_interval": 1000,
                    "seed": 0, "fused": True},
    }


def build_partitioned(config, ds: dict):
    """The model, constructed straight into NVMe-backed ZeRO-3 partitions (no weight init yet)."""
    import deepspeed
    from transformers import OPTForCausalLM
    from transformers.initialization import no_init_weights

    zero_init = {k: v for k, v in ds.items() if k != "subzero"}
    with deepspeed.zero.Init(config_dict_or_path=zero_init, dtype=torch.bfloat16), no_init_weights():
        model = OPTForCausalLM(config)
    config._attn_implementation = "sdpa"
    return model


def fill_random_(engine, seed: int) -> None:
    """Seeded N(0, 0.02) weights, unit norm weights, zero biases: each rank writes its own shards."""
    _, rank = get_world_size_and_rank()
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    with torch.no_grad():
        for shard in collect_shards(engine.module):
            with shard.swapped_in() as local:
                if shard.name.endswith("bias"):
                    local.zero_()
                elif "layer_norm" in shard.name:
                    local.fill_(1.0)
                else:
                    chunk = 1 << 24
                    for start in range(0, local.numel(), chunk):
                        piece = local[start : start + chunk]
                        piece.copy_(torch.randn(piece.numel(), generator=generator) * 0.02)
            gathered = shard.gathered()
            if gathered is not None:  # a persistent parameter DeepSpeed already holds gathered: refresh it
                engine.ds_engine.optimizer.empty_partition_cache()


def io_bytes() -> tuple[int, int]:
    counters = psutil.Process().io_counters()
    return counters.read_bytes, counters.write_bytes


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=list(OPT_SHAPES), default="13b")
    parser.add_argument("--nvme_path", default="/work/nvme")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--output", type=Path, help="default: bench/results/nvme_scale_<size>.md")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    init_distributed()
    world_size, rank = get_world_size_and_rank()
    config = opt_config(args.size)
    largest = math.ceil(VOCAB * config.hidden_size / world_size)  # the embedding's partition
    ds = ds_config(args.nvme_path, largest)

    started = time.perf_counter()
    model = build_partitioned(config, ds)
    engine = subzero_ds.initialize(model=model, config=ds)
    fill_random_(engine, seed=1)
    build_seconds = time.perf_counter() - started
    parameters = sum(s.numel for s in engine.shards)
    build_rss = peak_rss_gib()

    generator = torch.Generator().manual_seed(rank)
    rows = []
    for step in range(args.steps):
        ids = torch.randint(3, VOCAB, (1, args.seq_len), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        read0, written0 = io_bytes()
        t0 = time.perf_counter()
        result = engine.step(batch)
        seconds = time.perf_counter() - t0
        read1, written1 = io_bytes()
        rows.append((step, seconds, read1 - read0, written1 - written0, result.loss_pos, result.loss_neg))
    per_rank = all_gather_objects({"rows": rows, "peak_rss": peak_rss_gib(), "build_rss": build_rss})
    if rank == 0:
        swap_bytes = sum(f.stat().st_size for f in Path(args.nvme_path).rglob("*.swp"))
        ram = psutil.virtual_memory().total / 2**30
        lines = [
            f"# ZO steps on OPT-{args.size} ({parameters / 1e9:.2f}B parameters, bf16 = {parameters * 2 / 2**30:.1f} GiB) "
            f"with parameters on NVMe",
            "",
            f"`deepspeed --num_gpus {world_size} bench/nvme_scale.py --size {args.size} --steps {args.steps} "
            f"--seq_len {args.seq_len}`",
            "",
            f"Machine: {os.cpu_count()} cores, {ram:.1f} GiB RAM, no GPU; {world_size} ranks, ZeRO-3, fused SubZero "
            f"(r = 24), batch 1 × {args.seq_len} tokens per rank (doubled to [B; B] in the fused forward). "
            f"Swap files on disk: {swap_bytes / 2**30:.1f} GiB. Build (partitioned construction + random fill): "
            f"{build_seconds:.0f} s.",
            "",
            "| step | seconds | read from storage per rank (GiB) | written per rank (GiB) | ℓ+ | ℓ− |",
            "|---|---|---|---|---|---|",
        ]
        for step in range(args.steps):
            seconds = max(r["rows"][step][1] for r in per_rank)
            reads = " / ".join(f"{r['rows'][step][2] / 2**30:.2f}" for r in per_rank)
            writes = " / ".join(f"{r['rows'][step][3] / 2**30:.2f}" for r in per_rank)
            _, _, _, _, lp, ln = per_rank[0]["rows"][step]
            lines.append(f"| {step} | {seconds:.1f} | {reads} | {writes} | {lp:.4f} | {ln:.4f} |")
        lines += ["", "Peak RSS per rank: " + " / ".join(f"{r['peak_rss']:.2f} GiB" for r in per_rank)
                  + " (after building: " + " / ".join(f"{r['build_rss']:.2f}" for r in per_rank) + ")."]
        text = "\n".join(lines) + "\n"
        print(text)
        out = args.output or Path(__file__).parent / "results" / f"nvme_scale_{args.size}.md"
        out.write_text(text)
    exit_process(0)


if __name__ == "__main__":
    main()
