"""Trajectories of every ZO method on a tiny model (rank 0 saves losses and final weights).

Launched by tests/distributed/test_method_trajectories.py on 1 rank and on 2 ranks (deepspeed launcher); each
rank trains on its equal share of the same global batch, so both launches must follow the same
trajectory. With --resume_at N the run checkpoints at step N into --checkpoint, and with
--resume_from it continues from there instead of starting over (possibly on another world size).
"""

import argparse

import torch

import subzero_ds
from helpers.configs import zo_section
from subzero_ds.methods import registry
from helpers.tiny import pattern_batch, rank_slice, tiny_model
from subzero_ds.distributed import exit_process, get_world_size_and_rank, init_distributed
from subzero_ds.checkpoint.export import iter_full_state

STEPS, GLOBAL_BATCH = 12, 8
# name -> (subzero settings, extra DeepSpeed settings)
CASES = {
    "subzero-momentum": ({"update": "momentum", "lr": 2e-4}, {}),
    "subzero-adam-project": ({"update": "adam", "state_on_refresh": "project", "lr": 1e-3}, {}),
    "subzero-adam-fused": ({"update": "adam", "fused": True, "lr": 1e-3}, {}),
    "mezo-adam": ({"method": "mezo", "update": "adam", "lr": 1e-3}, {}),
    "subzero-queries": ({"queries": 3, "lr": 2e-4}, {}),
    "hizoo": ({"method": "hizoo", "lr": 5e-5, "hessian_smooth": 1e-3}, {}),  # its curvature term amplifies Δℓ
    "sparse-mezo": ({"method": "sparse_mezo", "lr": 2e-4, "mask_interval": 5}, {}),
    "subzero-accumulation": ({"lr": 2e-4}, {"gradient_accumulation_steps": 2}),
}
# Every other registered method, with its defaults (MeZO's plain trajectory is trajectory.py's, beside this file).
CASES.update({f"{name}-default": ({"method": name, "lr": 2e-4}, {}) for name in registry.method_names()
              if name not in {"subzero", "mezo", *(case.get("method") for case, _ in CASES.values())}})


def settings(name: str) -> dict:
    subzero, extra = CASES[name]
    return {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "subzero": zo_section(**{"method": "subzero", "eps": 1e-3, "rank": 4, "subspace_interval": 5, "seed": 3, **subzero}),
            **extra}


def run(name: str, args: argparse.Namespace) -> dict:
    world_size, rank = get_world_size_and_rank()
    config = settings(name)
    engine = subzero_ds.initialize(model=tiny_model("llama"), config=config)
    micro = engine.accumulation_steps
    start = 0
    if args.resume_from:
        engine.load_checkpoint(f"{args.resume_from}/{name}")
        start = engine.global_step
    losses = []
    for step in range(start, STEPS):
        share = rank_slice(pattern_batch(GLOBAL_BATCH, seed=step), rank, world_size)
        rows = GLOBAL_BATCH // world_size // micro
        for m in range(micro):
            result = engine.step({k: v[m * rows : (m + 1) * rows] for k, v in share.items()})
        losses.append((result.loss_pos, result.loss_neg))
        if args.resume_at is not None and step + 1 == args.resume_at:
            engine.save_checkpoint(f"{args.checkpoint}/{name}")
    return {"losses": losses, "state": dict(iter_full_state(engine.module))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--resume_at", type=int, default=None)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--resume_from", default=None)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    init_distributed()
    results = {name: run(name, args) for name in args.cases}
    if get_world_size_and_rank()[1] == 0:
        torch.save(results, args.out)
    exit_process(0)


if __name__ == "__main__":
    main()
