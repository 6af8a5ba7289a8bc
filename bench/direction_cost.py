"""What generating-and-applying one ZO pass costs per element, beside a plain copy of the shard.

Run from the repository root (one process, no DeepSpeed):

    .venv/bin/python bench/direction_cost.py                # rank 0's shards of OPT-1.3B over 8 ranks

For rank 0's ZeRO-3 shards of every parameter of an OPT-1.3B-shaped model (``--world`` ranks),
fp32, it times (best of ``--repeats``) one pass over all shards for:

- ``copy_``: ``shard.copy_(backup)``, the memory-bandwidth floor of this machine;
- perturb: shard ← backup + ε·D, and update: shard ← shard·(1 − ηλ) − ηg·D, each
  - *before*: the generators this project used up to the counter-based kernels (a CPU
    ``torch.Generator`` and ``randn`` per 65,536-element block; SubZero's U·Z·Vᵀ per 64-row block;
    then ``add_`` of the fp32 chunk), copied here so both run side by side;
  - *after*: ``Direction.apply_`` (one C++ generate-and-apply pass per shard; SubZero: a few matmuls
    and one apply pass per shard).

Writes a Markdown table to ``--output`` (default ``bench/results/direction_cost.md``) and prints it.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from pathlib import Path
from typing import Callable

import torch

from harness.report import publish

from subzero_ds.kernels.cpu import compiled
from subzero_ds.methods.base import Direction
from subzero_ds.methods.mezo import GaussianDirection
from subzero_ds.methods.subzero import SubspaceDirection


def opt_shapes(hidden: int = 2048, ffn: int = 8192, layers: int = 24, vocab: int = 50272,
               positions: int = 2050) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of an OPT model (OPT-1.3B by default)."""
    shapes = [("embed_tokens.weight", (vocab, hidden)), ("embed_positions.weight", (positions, hidden))]
    for i in range(layers):
        p = f"layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes += [(p + proj + ".weight", (hidden, hidden)), (p + proj + ".bias", (hidden,))]
        shapes += [(p + "fc1.weight", (ffn, hidden)), (p + "fc1.bias", (ffn,)),
                   (p + "fc2.weight", (hidden, ffn)), (p + "fc2.bias", (hidden,))]
        shapes += [(p + n, (hidden,)) for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")]
    return shapes + [("final_ln.weight", (hidden,)), ("final_ln.bias", (hidden,))]


def rank0_range(numel: int, world: int) -> tuple[int, int]:
    """Rank 0's flat range of a ZeRO-3 partitioned parameter."""
    return 0, min(numel, math.ceil(numel / world))


# --- the generators before the counter-based kernels (subzero_ds/perturbation.py until then) ---------
def _legacy_seed(*fields: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(fields).encode(), digest_size=8).digest(), "little") >> 1


def legacy_gaussian_chunks(key: tuple, numel: int, start: int, end: int):
    block_size = 1 << 16
    for block in range(start // block_size, math.ceil(end / block_size)):
        block_start = block * block_size
        size = min(block_size, numel - block_start)
        generator = torch.Generator().manual_seed(_legacy_seed(*key, block))
        values = torch.randn(size, generator=generator)
        lo, hi = max(start, block_start), min(end, block_start + size)
        yield lo, values[lo - block_start : hi - block_start]


def legacy_lowrank_chunks(u: torch.Tensor, core_vt: torch.Tensor, start: int, end: int):
    rows, cols = u.shape[0], core_vt.shape[1]
    for block in range(start // cols // 64, (end - 1) // cols // 64 + 1):
        row0, row1 = block * 64, min(block * 64 + 64, rows)
        values = (u[row0:row1] @ core_vt).view(-1)
        lo, hi = max(start, row0 * cols), min(end, row1 * cols)
        yield lo, values[lo - row0 * cols : hi - row0 * cols]


def legacy_pass(direction: Direction, shards, step: int, beta: float, alpha: float, from_backup: bool) -> None:
    """One pass as the optimizer wrote it before: an fp32 chunk of D, an fp32 copy of θ, add, store."""
    for name, shape, start, end, local, backup in shards:
        source = backup if from_backup else local
        if isinstance(direction, SubspaceDirection) and len(shape) == 2:
            factors = direction.lowrank(name, shape, step)
            chunks = legacy_lowrank_chunks(factors.u, factors.core @ factors.v.T, start, end)
        else:
            chunks = legacy_gaussian_chunks((direction.seed, "gaussian", step, name, shape), math.prod(shape), start, end)
        for lo, d in chunks:
            piece = slice(lo - start, lo - start + d.numel())
            theta = source[piece].to(torch.float32, copy=True)
            local[piece] = theta.mul_(beta).add_(d, alpha=alpha)


def current_pass(direction: Direction, shards, step: int, beta: float, alpha: float, from_backup: bool) -> None:
    """One pass as the optimizer writes it now."""
    for name, shape, start, end, local, backup in shards:
        direction.apply_(local, backup if from_backup else local, name, shape, step, start, beta, alpha)


def best_of(fn: Callable[[], None], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=8, help="ranks the model is partitioned over")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, default=Path("bench/results/direction_cost.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert compiled() is not None, "the CPU kernel did not build"

    shards = []
    for name, shape in opt_shapes():
        start, end = rank0_range(math.prod(shape), args.world)
        shards.append((name, shape, start, end, torch.randn(end - start) * 0.02, torch.randn(end - start) * 0.02))
    elements = sum(s[3] - s[2] for s in shards)
    copy_s = best_of(lambda: [local.copy_(backup) for *_, local, backup in shards], args.repeats)
    copy_ns = copy_s / elements * 1e9

    rows = []
    methods = {"SubZero (r = 24)": SubspaceDirection(seed=0, rank=24, interval=1000, reshape=False),
               "MeZO": GaussianDirection(seed=0)}
    for label, direction in methods.items():
        for phase, beta, alpha, from_backup in (("perturb", 1.0, 1e-3, True), ("update", 1.0 - 1e-7, -1e-6, False)):
            before = best_of(lambda: legacy_pass(direction, shards, 0, beta, alpha, from_backup), args.repeats)
            after = best_of(lambda: current_pass(direction, shards, 0, beta, alpha, from_backup), args.repeats)
            rows.append((label, phase, before / elements * 1e9, after / elements * 1e9))

    lines = [
        f"# Direction generate-and-apply cost per element (`bench/direction_cost.py`)",
        "",
        f"Rank 0's shards of an OPT-1.3B-shaped model over {args.world} ranks: {elements:,} fp32 elements, "
        f"{args.threads} thread(s), best of {args.repeats}. `copy_` of the shard: **{copy_ns:.2f} ns/element** "
        f"({copy_s:.3f} s).",
        "",
        "| method | pass | before (ns/elem) | ÷ copy | after (ns/elem) | ÷ copy | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, phase, before, after in rows:
        lines.append(f"| {label} | {phase} | {before:.2f} | {before / copy_ns:.1f}× | {after:.2f} | "
                     f"{after / copy_ns:.1f}× | {before / after:.1f}× |")
    publish("\n".join(lines) + "\n", args.output, "direction_cost")


if __name__ == "__main__":
    main()
