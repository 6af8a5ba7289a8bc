"""Claim: SubZero's update of q directions is one low-rank pass whatever q is; MeZO's costs a pass per direction.

Perturbation mode (``"replica_mode": "perturbation"``) makes a step estimate R·q directions (R replica groups),
and every rank then writes the mean of all R·q updates into its shards. The q directions of a SubZero window
share U and V, so Σ_j g_j·μ·U·Z_j·Vᵀ = μ·U·(Σ_j g_j·Z_j)·Vᵀ is one pass (``SubspaceDirection.apply_mean_``);
MeZO's Gaussian directions have no common factor and take one generate-and-apply pass each.

Run from the repository root (one process, no DeepSpeed):

    .venv/bin/python bench/update_queries.py              # rank 0's shards of OPT-1.3B over 8 ranks, q = 1..16

Times (best of ``--repeats``) one update pass over every shard, fp32, as ZO-SGD writes it, for each q, and
writes a Markdown table to ``--output`` (default ``bench/results/update_queries.md``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from harness.report import publish

from direction_cost import best_of, opt_shapes, rank0_range
from subzero_ds.methods.mezo import GaussianDirection
from subzero_ds.methods.subzero import SubspaceDirection


def update_pass(direction, shards, queries: int) -> None:
    """θ ← θ·(1 − ηλ) − η·(1/q)·Σ_j g_j·D_j over every shard (ZO-SGD's write)."""
    grads = [0.5 - 0.1 * j for j in range(queries)]
    for name, shape, start, local in shards:
        direction.apply_mean_(local, local, name, shape, 0, start, grads, beta=1.0 - 1e-7, alpha=-1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=8, help="ranks the model is partitioned over")
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("bench/results/update_queries.md"))
    args = parser.parse_args()
    shards = []
    for name, shape in opt_shapes():
        start, end = rank0_range(math.prod(shape), args.world)
        shards.append((name, shape, start, torch.randn(end - start) * 0.02))
    elements = sum(local.numel() for *_, local in shards)
    subzero = SubspaceDirection(seed=0, rank=24, interval=1000, reshape=False)
    matrices = [shard for shard in shards if len(shard[1]) == 2]
    vectors = [shard for shard in shards if len(shard[1]) != 2]
    rows = {"SubZero (r = 24), all": (subzero, shards),
            f"… its {len(matrices)} matrices (low-rank)": (subzero, matrices),
            f"… its {len(vectors)} biases and norms (Gaussian)": (subzero, vectors),
            "MeZO, all": (GaussianDirection(seed=0), shards)}
    seconds = {label: {q: best_of(lambda: update_pass(direction, subset, q), args.repeats) for q in args.queries}
               for label, (direction, subset) in rows.items()}
    lines = [
        "# One ZO-SGD update of q directions (`bench/update_queries.py`)",
        "",
        f"Rank 0's shards of an OPT-1.3B-shaped model over {args.world} ranks: {elements:,} fp32 elements, "
        f"{torch.get_num_threads()} thread(s), best of {args.repeats}. Perturbation mode's R groups × q directions "
        "make a step's update R·q directions. SubZero's biases and norms take MeZO's Gaussian direction, a pass per "
        "query: tiny tensors, where each pass costs mostly its dispatch.",
        "",
        "| method | " + " | ".join(f"q = {q}" for q in args.queries) + " | q = " + f"{args.queries[-1]} ÷ q = 1 |",
        "|---|" + "---:|" * (len(args.queries) + 1),
    ]
    for label, by_q in seconds.items():
        first, last = by_q[args.queries[0]], by_q[args.queries[-1]]
        lines.append(f"| {label} | " + " | ".join(f"{by_q[q]:.3f} s" for q in args.queries) + f" | {last / first:.2f}× |")
    publish("\n".join(lines) + "\n", args.output, "update_queries")


if __name__ == "__main__":
    main()
