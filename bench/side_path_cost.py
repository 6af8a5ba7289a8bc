"""What the fused ± pass's side path costs on one Linear: with a full-size delta, and as ``addmm_``.

Run from the repository root (one process, one thread, no DeepSpeed):

    .venv/bin/python bench/side_path_cost.py

For the doubled batch of ``bench/step_cost.py`` (2 × 16 × 128 rows) and OPT-125M's Linear shapes,
SubZero rank 24, it times (best of 3): the Linear's own matmul; the side path as
``subzero_ds/fused.py`` first applied it (input upcast to fp32, a full-size fp32
``delta = ((x V) ⊙ ±ε) R``, then ``output.add_(delta)``); and the same product accumulated into
the output with ``output.addmm_`` (no full-size temporary), as ``subzero_ds/fused/side_paths.py`` now does. Times are multiplied by how often the shape occurs
in the model (12 fc1, 48 attention projections, 1 LM head). ``--rows`` (default 4096) and
``--repeats`` (default 3) shrink it for a smoke test; ``--output`` also writes the lines to a file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch

ROWS, RANK = 2 * 16 * 128, 24
SHAPES = [(768, 50272, 1, "LM head 768 x 50272"), (768, 3072, 12, "fc1 768 x 3072 (x12)"),
          (768, 768, 48, "q/k/v/out 768 x 768 (x48)")]  # fmt: skip


def best_of(fn: Callable[[], None], repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Print one line per (dtype, shape)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=ROWS, help="rows of the doubled batch [B; B]")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (the best counts)")
    parser.add_argument("--output", type=Path, help="also write the lines to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        for m, n, count, name in SHAPES:
            x, w = torch.randn(args.rows, m, dtype=dtype), torch.randn(n, m, dtype=dtype) * 0.02
            v, right = torch.randn(m, RANK), torch.randn(RANK, n)
            signs = torch.full((args.rows, 1), 1e-3)
            signs[args.rows // 2 :] = -1e-3
            out = torch.nn.functional.linear(x, w)

            def matmul() -> None:
                torch.nn.functional.linear(x, w)

            def full_delta() -> None:
                out.add_(((x.to(torch.float32) @ v) * signs) @ right)

            def as_addmm() -> None:
                out.addmm_(((x.to(torch.float32) @ v) * signs).to(out.dtype), right.to(out.dtype))

            seconds = [best_of(fn, args.repeats) * count for fn in (matmul, full_delta, as_addmm)]
            lines.append(f"{str(dtype)[6:]:8s} {name:26s} matmul {seconds[0]:6.2f} s  side path with full delta "
                         f"{seconds[1]:5.2f} s  as addmm_ {seconds[2]:5.2f} s")
            print(lines[-1], flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
