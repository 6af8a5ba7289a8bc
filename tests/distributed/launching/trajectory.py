"""Run short ZO trajectories of tiny models and save losses and final weights (rank 0 writes).

Launched by tests/distributed/test_equivalence.py as a plain process (1 rank), with
``deepspeed --num_gpus 2`` and with ``mpirun -np 2``; each rank trains on its equal share of
the same global batch, so every launch must follow the same trajectory.
"""

import argparse
import functools
import json

import torch

import subzero_ds
from subzero_ds.adapters import Tuning, add_adapter
from helpers.configs import zo_section
from subzero_ds.config import ConfigError
from helpers.tiny import pattern_batch, rank_slice, tiny_model
from subzero_ds.distributed import get_world_size_and_rank
from subzero_ds.checkpoint.export import iter_full_state

# The fp32 losses of 1 and 2 ranks differ by ~1 ulp (reduction order); g = Δℓ/2ε turns that into
# ~1e-4 of g, so the weights drift apart by ~lr·1e-4·|D| per step: 2e-4 keeps 20 steps within 1e-5
# while still moving the weights by ~1e-2.
LR = 2e-4

# name -> (architecture, ZeRO stage, method, stage3_param_persistence_threshold, tuning)
CASES = {
    "opt-zero3-subzero": ("opt", 3, "subzero", 100_000, "full"),
    "llama-zero3-subzero": ("llama", 3, "subzero", 100_000, "full"),
    "opt-zero3-mezo": ("opt", 3, "mezo", 100_000, "full"),
    "llama-zero3-mezo": ("llama", 3, "mezo", 100_000, "full"),
    "llama-zero3-subzero-partitioned": ("llama", 3, "subzero", 0, "full"),
    "opt-zero0-subzero": ("opt", 0, "subzero", 0, "full"),
    "llama-zero3-subzero-lora": ("llama", 3, "subzero", 0, "lora"),
}


def run_case(arch: str, stage: int, method: str, persistence: int, tuning: str, steps: int, global_batch: int,
             seed: int, zero_extra: dict | None = None, subzero_extra: dict | None = None) -> dict:
    lr = LR * 2 if tuning == "lora" else LR  # LoRA has fewer, smaller-gradient elements: a larger step still fits 1e-5
    config = {
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": persistence, **(zero_extra or {})},
        "subzero": zo_section(method, lr=lr, eps=1e-3, rank=4, subspace_interval=7, seed=seed, **(subzero_extra or {})),
    }
    engine = subzero_ds.initialize(model=add_adapter(tiny_model(arch), Tuning(tuning)), config=config)
    world_size, rank = get_world_size_and_rank()
    losses = []
    for step in range(steps):
        result = engine.step(rank_slice(pattern_batch(global_batch, seed=step), rank, world_size))
        losses.append((result.loss_pos, result.loss_neg))
    return {"losses": losses, "state": dict(iter_full_state(engine.module))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global_batch", type=int, default=8)
    parser.add_argument("--seed_differs_per_rank", action="store_true")
    parser.add_argument("--model_differs_per_rank", action="store_true", help="rank 1 builds a 3-layer model")
    parser.add_argument("--zero", type=json.loads, default=None, help="JSON merged into zero_optimization")
    parser.add_argument("--subzero", type=json.loads, default=None, help="JSON merged into the subzero section")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()

    subzero_ds.distributed.init_distributed()
    world_size, rank = get_world_size_and_rank()
    seed = 5 + (rank if args.seed_differs_per_rank else 0)
    if args.model_differs_per_rank and rank == 1:
        global tiny_model
        tiny_model = functools.partial(tiny_model, layers=3)
    try:
        results = {name: run_case(*CASES[name], args.steps, args.global_batch, seed, args.zero, args.subzero)
                   for name in args.cases}
    except ConfigError as e:
        print(f"rank {rank}: ConfigError: {e}", flush=True)
        subzero_ds.distributed.exit_process(3)
    if rank == 0:
        torch.save({"world_size": world_size, "results": results}, args.out)
    subzero_ds.distributed.exit_process(0)


if __name__ == "__main__":
    main()
