"""The rank of bench/hpz_link.py: ZO steps of OPT-125M on 2 "nodes", with the link between them at several rates.

Launched on every node by ``deepspeed --hostfile H --no_ssh --node_rank K … --module harness.link_worker``
(bench/ on ``PYTHONPATH``). It builds the model (random weights, partitioned by ZeRO-3 as it is created)
and the engine, takes one first step on the unshaped link, then ``--steps`` rounds of one step per
rate: the node's local rank 0 limits its own end of the link (``tc``), and the ranks take the step,
timed from a barrier (rates in turn, so a change in the machine's load hits every rate alike). Rank 0
runs inside node 0, so it reads the bytes that crossed the link itself: rx + tx of its end, between
barriers around each step. The collectives' bytes are counted too (per process group), to say what
the bytes on the link were. Rank 0 writes everything as JSON to ``--result``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import subzero_ds
from subzero_ds.distributed import get_world_size_and_rank, init_distributed

from .collectives import CollectiveCounter
from .models import DTYPES, MODELS, Batch, build_partitioned, random_batch
from .netns import RATES, link_counters, shape_link
from .workers import exit_cleanly, timed


def ds_config(args: argparse.Namespace) -> dict[str, Any]:
    """ZeRO-3 (with hpZ groups of ``--hpz`` ranks when > 1) and SubZero's defaults, ``--replica-mode`` aside."""
    zero: dict[str, Any] = {"stage": 3}
    if args.hpz > 1:
        zero["zero_hpz_partition_size"] = args.hpz
    subzero = {} if args.replica_mode == "data" else {"replica_mode": args.replica_mode}
    return {"train_micro_batch_size_per_gpu": args.rows, "gradient_accumulation_steps": 1, "zero_optimization": zero,
            "bf16": {"enabled": args.dtype == "bf16"}, "steps_per_print": 1 << 30, "subzero": subzero}


def batch_of(step: int, args: argparse.Namespace, vocab: int) -> Batch:
    """This rank's ``--rows`` rows of the step's batch: in data mode its share of a global batch over all ranks,
    in perturbation mode its share (rank within the group) of the batch every group takes."""
    world_size, rank = get_world_size_and_rank()
    index, shares = (rank % args.hpz, args.hpz) if args.replica_mode == "perturbation" else (rank, world_size)
    batch = random_batch(args.rows * shares, args.seq_len, vocab, seed=step)
    return {k: v[index * args.rows : (index + 1) * args.rows] for k, v in batch.items()}


def window(engine: Any, args: argparse.Namespace, first: int, steps: int, counter: CollectiveCounter) -> dict[str, Any]:
    """Take ``steps`` steps from step ``first``: this rank's seconds per step, losses, collectives' bytes, and
    (on rank 0) the bytes that crossed the link, counters read between barriers around the steps."""
    vocab = engine.module.config.vocab_size
    losses: list[float] = []
    counter.take()
    counter.gathered_by_group.clear()
    counter.all_reduces.clear()
    dist.barrier()
    before = link_counters()
    counter.active = True
    seconds = [timed(lambda s=s: losses.append(engine.step(batch_of(s, args, vocab)).loss))
               for s in range(first, first + steps)]
    dist.barrier()
    crossed = [after - start for after, start in zip(link_counters(), before)]  # rank 0's: node 0's end
    counter.active = False
    gathered, reduced = counter.take()
    return {"step_s": seconds, "losses": losses, "link_bytes": crossed[0], "link_frames": crossed[1],
            "gathered_bytes": gathered, "reduced_bytes": reduced, "all_reduce_elements": sum(counter.all_reduces),
            "gathered_by_group": {",".join(map(str, g)): b for g, b in counter.gathered_by_group.items()}}


def barriers_alone() -> list[int]:
    """(bytes, frames) across the link (rank 0's count) for what a window adds around a step: its barriers."""
    dist.barrier()
    before = link_counters()
    dist.barrier()  # timed()'s
    dist.barrier()  # the window's closing one
    return [after - start for after, start in zip(link_counters(), before)]


def merged(total: dict[str, Any] | None, more: dict[str, Any]) -> dict[str, Any]:
    """Two windows' numbers as one: lists joined, counts added (per process group too)."""
    if total is None:
        return more
    groups = {g: total["gathered_by_group"].get(g, 0) + more["gathered_by_group"].get(g, 0)
              for g in {**total["gathered_by_group"], **more["gathered_by_group"]}}
    return {**{k: total[k] + v for k, v in more.items() if k != "gathered_by_group"}, "gathered_by_group": groups}


def main() -> None:
    """Measure the first step, then ``--steps`` steps at every rate of ``--rates`` (in turn); rank 0 writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hpz", type=int, default=1, help="zero_hpz_partition_size (1: plain ZeRO-3)")
    parser.add_argument("--replica-mode", choices=["data", "perturbation"], default="data")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--rows", type=int, default=2, help="rows per rank")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per rate")
    parser.add_argument("--rates", nargs="+", choices=list(RATES), default=list(RATES))
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_distributed()
    world_size, rank = get_world_size_and_rank()
    counter = CollectiveCounter()
    counter.install()
    config = ds_config(args)
    model = build_partitioned(MODELS["opt"].model_class, MODELS["opt"].config(), config, DTYPES[args.dtype])
    engine = subzero_ds.initialize(model=model, config=config)
    params = sum(int(p.ds_numel) for p in engine.module.parameters())
    windows = {"first step": window(engine, args, 0, 1, counter)}
    for step in range(1, 1 + args.steps * len(args.rates)):  # rates in turn, a step each: drifts in load hit all alike
        rate = args.rates[(step - 1) % len(args.rates)]
        if int(os.environ["LOCAL_RANK"]) == 0:  # each node limits its own end: both directions are shaped
            shape_link(rate)
        windows[rate] = merged(windows.get(rate), window(engine, args, step, 1, counter))
    barriers = barriers_alone()
    every_rank: list[Any] = [None] * world_size
    dist.all_gather_object(every_rank, windows)
    if rank == 0:
        result = {"world_size": world_size, "params": params, "bytes_per_param": DTYPES[args.dtype].itemsize,
                  "barriers_bytes": barriers[0], "barriers_frames": barriers[1],
                  "windows": {name: {**w, "step_s": [max(r[name]["step_s"][i] for r in every_rank)
                                                     for i in range(len(w["step_s"]))]}
                              for name, w in windows.items()}}
        args.result.write_text(json.dumps(result, indent=1))
    exit_cleanly(0)


if __name__ == "__main__":
    main()
