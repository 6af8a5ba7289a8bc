"""Claim: the fused ± pass all-gathers at most 0.55× the bytes of the in-place passes per step (ZeRO-3).

Run from the repository root (2 ranks, ZeRO-3, CPU + gloo):

    deepspeed --num_gpus 2 bench/gather_bytes.py --model opt --dtype fp32 bf16 --method subzero mezo

Options are ``bench/step_cost.py``'s (``bench/harness/steps.py``), with other defaults:
``--method subzero``, ``--mode in-place fused``, ``--steps 1``, ``--warmup 1``,
``--output bench/results/gather_bytes.md``. Every (model, dtype, method) runs in place and fused,
each in a fresh pair of worker processes; the bytes are counted while a measured step runs (and,
for reference, while two plain forwards run) by wrapping the collectives of DeepSpeed's
communication backend and of ``torch.distributed`` (``harness/collectives.py``). The numbers do
not depend on timing, so one measured step is enough; the step times are not reported here
(``bench/step_cost.py`` reports them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.report import heading, table
from harness.steps import UNFUSED, Row, parse_args, run_all, setup_note
from harness.workers import run_launched


TARGET = 0.55  # fused ÷ in-place all-gathered bytes per step


def pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    """(in-place row, fused row) of every (model, dtype, method) that ran both ways."""
    in_place = {(c.model, c.dtype, c.method): r for r in rows if (c := r.configuration).mode == "in-place"}
    return [(in_place[c.model, c.dtype, c.method], r) for r in rows
            if (c := r.configuration).mode == "fused" and (c.model, c.dtype, c.method) in in_place]


def markdown_report(rows: list[Row], args: argparse.Namespace, world_size: int, wall_s: float) -> str:
    """Per (model, dtype, method): MiB all-gathered per step in place and fused, their ratio, and the verdict."""
    lines = heading("Communication: bytes all-gathered per ZO step, fused vs in place", world_size,
                    "bench/gather_bytes.py", setup_note(rows, args, world_size, wall_s))
    cells = []
    for in_place, fused in pairs(rows):
        c, ratio = fused.configuration, fused.gathered_mib / max(in_place.gathered_mib, 1e-30)
        verdict = f"**{ratio:.3f}** ({'met' if ratio <= TARGET else 'missed'})" if in_place.gathered_mib else \
            "— (nothing gathered: one rank?)"
        cells.append([c.model, c.dtype, c.method, f"{in_place.gathered_mib:,.0f}", f"{fused.gathered_mib:,.0f}", verdict,
                      "—" if args.no_forwards else f"{in_place.forward2_gathered_mib:,.0f}"])
    lines += table(["model", "dtype", "method", "in-place MiB per step", "fused MiB per step", "fused ÷ in-place",
                    "MiB per 2 plain forwards"], cells)
    unpaired = sorted({r.configuration.method for r in rows if r.configuration.method in UNFUSED})
    lines += [
        "",
        f"Target: fused ≤ {TARGET}× in-place. Counted per rank by wrapping the all-gathers of DeepSpeed's "
        "communication backend and of `torch.distributed` in the worker while a step (or a forward pair) runs; an "
        "all-gather counts its whole output tensor (the full parameter that lands on the rank), so a rank receives "
        "(world − 1)/world of it over the wire. The largest value over ranks and measured steps. ZeRO-3 keeps "
        "parameters below its persistence threshold gathered, so they do not show up."
        + (f" Not fusable (registry), so not paired: {', '.join(unpaired)}." if unpaired else ""),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run every (model, dtype, method) in place and fused in fresh workers; rank 0 writes the report."""
    args = parse_args(description=__doc__.split("\n\n")[0], method=["subzero"], steps=1, warmup=1,
                      output=Path("bench/results/gather_bytes.md"))
    run_launched(args, run_all, markdown_report, "gather_bytes")


if __name__ == "__main__":
    main()
