"""Soak: a long ZO run with periodic checkpoints and a resume in the middle.

    deepspeed --num_gpus 2 bench/soak.py [--steps 2000] [--save_every 100] [--fused]

Checks, and prints as a table:
- RSS of every rank stays flat: growth from the end of warm-up (10% of the steps) to the end < 5%;
- every checkpoint written loads (checksums, shapes) into a fresh engine;
- a fresh engine resumed from the middle checkpoint ends with weights bit-identical to the
  uninterrupted run's, and the same losses.
Writes ``--output`` (default bench/results/soak[_fused].md; rank 0). Exit code 1 if a check fails.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

import subzero_ds
from subzero_ds.checkpoint.sharded import list_checkpoints
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny models
from helpers.tiny import pattern_batch, rank_slice, tiny_model  # noqa: E402
from subzero_ds.distributed import all_gather_objects, exit_process, get_world_size_and_rank, init_distributed
from subzero_ds.checkpoint.export import iter_full_state

GLOBAL_BATCH = 8


def make_engine(fused: bool):
    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000},
              "subzero": {"lr": 2e-4, "eps": 1e-3, "rank": 4, "subspace_interval": 50, "seed": 11, "fused": fused}}
    return subzero_ds.initialize(model=tiny_model("llama"), config=config)


def train_to(engine, last_step: int, on_step=None) -> list[tuple[float, float]]:
    world_size, rank = get_world_size_and_rank()
    losses = []
    while engine.global_step < last_step:
        batch = rank_slice(pattern_batch(GLOBAL_BATCH, seed=engine.global_step), rank, world_size)
        result = engine.step(batch)
        losses.append((result.loss_pos, result.loss_neg))
        if on_step:
            on_step(engine)
    return losses


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--save_every", type=int, default=100)
    parser.add_argument("--fused", action="store_true")
    parser.add_argument("--output", type=Path, help="default: bench/results/soak[_fused].md")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    init_distributed()
    world_size, rank = get_world_size_and_rank()
    root = Path(all_gather_objects(tempfile.mkdtemp(prefix="soak-") if rank == 0 else None)[0])

    rss: list[tuple[int, float]] = []

    def every_step(engine) -> None:
        step = engine.global_step
        if step % args.save_every == 0:
            engine.save_checkpoint(root)
        if step % 50 == 0:
            rss.append((step, rss_mib()))

    started = time.perf_counter()
    engine = make_engine(args.fused)
    losses = train_to(engine, args.steps, every_step)
    seconds = time.perf_counter() - started
    reference = dict(iter_full_state(engine.module))

    checkpoints = list_checkpoints(root)
    fresh = make_engine(args.fused)
    for checkpoint in checkpoints:  # every one loads (checksums verified, ranges re-cut)
        fresh.load_checkpoint(checkpoint)
    middle = root / f"checkpoint-{(args.steps // 2) // args.save_every * args.save_every}"
    resumed = make_engine(args.fused)
    resumed.load_checkpoint(middle)
    resumed_losses = train_to(resumed, args.steps)
    state = dict(iter_full_state(resumed.module))
    identical = all(torch.equal(state[k], reference[k]) for k in reference)
    same_losses = resumed_losses == losses[resumed.global_step - len(resumed_losses):]

    warm = [mib for step, mib in rss if step >= args.steps // 10]
    growth = (warm[-1] - warm[0]) / warm[0]
    per_rank = all_gather_objects((warm[0], warm[-1], max(warm), growth))
    ok = all(g < 0.05 for *_, g in per_rank) and identical and same_losses and len(checkpoints) == args.steps // args.save_every
    if rank == 0:
        mode = "fused" if args.fused else "in-place"
        lines = [
            f"# Soak: {args.steps} steps, tiny LLaMA, {world_size} ranks, ZeRO-3, {mode}",
            "",
            f"`deepspeed --num_gpus {world_size} bench/soak.py --steps {args.steps} --save_every {args.save_every}"
            + (" --fused" if args.fused else "") + "`",
            "",
            "| rank | RSS after warm-up (MiB) | RSS at the end (MiB) | peak (MiB) | growth |",
            "|---|---|---|---|---|",
            *[f"| {r} | {a:.1f} | {b:.1f} | {p:.1f} | {g:+.2%} |" for r, (a, b, p, g) in enumerate(per_rank)],
            "",
            f"- {seconds:.0f} s for {args.steps} steps ({seconds / args.steps * 1000:.0f} ms/step, checkpoints included)",
            f"- checkpoints written and loaded: {len(checkpoints)} of {args.steps // args.save_every}",
            f"- resumed from {middle.name}: final weights bit-identical: {identical}; same losses: {same_losses}",
            f"- verdict: {'PASS' if ok else 'FAIL'}",
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        out = args.output or Path(__file__).parent / "results" / f"soak{'_fused' if args.fused else ''}.md"
        out.write_text(text)
        shutil.rmtree(root, ignore_errors=True)
    exit_process(0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
