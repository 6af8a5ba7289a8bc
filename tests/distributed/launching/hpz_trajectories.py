"""Trajectories under ZeRO++ hpZ and replica modes (rank 0 saves losses and final weights), launched by
tests/distributed/test_hpz.py and test_replica_modes.py.

The same cases run on 4 ranks as 2 hpZ groups × 2 (``--hpz 2``), on 2 plain ZeRO-3 ranks and on 1 rank, each
rank on its equal share of the same global batch, so all must follow one trajectory. With ``--hpz``, after
every step each rank checks directly that its range of the secondary copy (what forwards gather from) equals
the same range of the primary shards gathered over the world, and that a persistent parameter's gathered copy
equals them too: "never stale", not only "same trajectory".
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

import subzero_ds
from helpers.configs import zo_section
from helpers.tiny import pattern_batch, rank_slice, tiny_model
from subzero_ds.checkpoint.export import iter_full_state
from subzero_ds.distributed import exit_process, get_world_size_and_rank, init_distributed

STEPS, GLOBAL_BATCH, RESUME_AT = 8, 8, 5
LR = 2e-4
# name -> (architecture, subzero settings, extra zero_optimization settings, extra DeepSpeed settings)
CASES = {
    "subzero": ("llama", {}, {}, {}),
    "subzero-fused": ("llama", {"fused": True}, {}, {}),
    "mezo-persistent": ("opt", {"method": "mezo"}, {"stage3_param_persistence_threshold": 100_000}, {}),
    "subzero-bf16-stochastic": ("llama", {"update_rounding": "stochastic", "lr": 2e-3}, {}, {"bf16": {"enabled": True}}),
    "subzero-offload-cpu": ("llama", {}, {"offload_param": {"device": "cpu"}}, {}),
    "subzero-adam": ("llama", {"update": "adam", "lr": 1e-3}, {}, {}),  # r×r state per matrix, full for the rest
    "mezo-momentum": ("opt", {"method": "mezo", "update": "momentum"}, {}, {}),  # state for both ranges
    "subzero-zero0": ("llama", {}, {"stage": 0}, {}),  # no hpZ: every rank a replica group of its own
}


def config(name: str, hpz: int, subzero_extra: dict) -> dict:
    _, subzero, zero, extra = CASES[name]
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, **zero}
    if hpz > 1:
        zero["zero_hpz_partition_size"] = hpz
    section = {"method": "subzero", "lr": LR, "eps": 1e-3, "rank": 4, "subspace_interval": 5, "seed": 7,
               **subzero, **subzero_extra}
    return {"zero_optimization": zero, "subzero": zo_section(**section), **extra}


def stale_elements(engine) -> int:
    """Elements of this rank's secondary ranges (and gathered persistent copies) that differ from the primary
    shards gathered over the world. Collective."""
    stale = 0
    for shard in engine.shards:
        param = shard.param
        parts = [torch.empty_like(param.ds_tensor) for _ in range(dist.get_world_size(param.ds_process_group))]
        dist.all_gather(parts, param.ds_tensor.data, group=param.ds_process_group)
        primary = torch.cat(parts)[: shard.numel]
        if param.ds_secondary_tensor is not None:  # read as DeepSpeed's gathers do, not through subzero_ds
            secondary = param.ds_secondary_tensor.view(-1)[: shard.secondary_end - shard.secondary_start]
            stale += int((secondary != primary[shard.secondary_start : shard.secondary_end]).sum())
        gathered = shard.gathered()
        if gathered is not None:
            stale += int((gathered != primary).sum())
    return stale


def run(name: str, args: argparse.Namespace) -> dict:
    engine = subzero_ds.initialize(model=tiny_model(CASES[name][0]), config=config(name, args.hpz, args.subzero))
    share, shares = engine.replicas.batch_share()  # perturbation mode: a group's batch
    start = 0
    if args.resume_from:
        engine.load_checkpoint(f"{args.resume_from}/{name}")
        start = engine.global_step
    losses, grads, stale, secondary_ranges = [], [], [], 0
    for step in range(start, STEPS):
        result = engine.step(rank_slice(pattern_batch(GLOBAL_BATCH, seed=step), share, shares))
        losses.append((result.loss_pos, result.loss_neg))
        grads.append(list(result.projected_grads))
        if args.hpz > 1:
            stale.append(stale_elements(engine))
        if args.checkpoint and step + 1 == RESUME_AT:
            engine.save_checkpoint(f"{args.checkpoint}/{name}")
    if args.hpz > 1:
        secondary_ranges = sum(shard.param.ds_secondary_tensor is not None for shard in engine.shards)
    if args.export:
        engine.save_pretrained(f"{args.export}/{name}")
    state = dict(iter_full_state(engine.module))
    stale = torch.tensor(stale, dtype=torch.int64)
    dist.all_reduce(stale)  # every rank's stale elements
    return {"losses": losses, "state": state, "stale": stale.tolist(), "secondary_ranges": secondary_ranges,
            "grads": grads, "shards": len(engine.shards),
            "shard_backups": None if engine.probes.theta is None else len(engine.probes.theta.local)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", nargs="+", default=[c for c in CASES if CASES[c][2].get("stage", 3) == 3],
                        choices=list(CASES))
    parser.add_argument("--hpz", type=int, default=1, help="zero_hpz_partition_size (1: plain ZeRO-3)")
    parser.add_argument("--subzero", type=json.loads, default={}, help="JSON merged into every case's subzero section")
    parser.add_argument("--checkpoint", default=None, help=f"checkpoint each case at step {RESUME_AT} here")
    parser.add_argument("--resume_from", default=None)
    parser.add_argument("--export", default=None)
    args = parser.parse_args()
    init_distributed()
    results = {name: run(name, args) for name in args.cases}
    if get_world_size_and_rank()[1] == 0:
        torch.save({"world_size": get_world_size_and_rank()[0], "results": results}, Path(args.out))
    exit_process(0)


if __name__ == "__main__":
    main()
