"""Reports: Markdown helpers, and publishing a report (written to its path and printed)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from subzero_ds.distributed import log


def publish(report: str, output: Path, name: str, raw: Any = None) -> None:
    """Write a benchmark's markdown report to ``output`` and print it; ``raw`` (JSON-serializable), when
    given, goes next to it (``.json``)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    if raw is not None:
        output.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(report, flush=True)
    log(f"{name}: report written to {output}")


def write_json(rows: list[Any], path: Path) -> None:
    """The rows, machine-readable, next to the Markdown report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in rows], indent=1))


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def per_rank(values: list[float]) -> str:
    """MiB values of every rank, "r0 / r1 / …"."""
    return " / ".join(f"{v:,.0f}" for v in values)


def command_line(world_size: int, script: str = "bench/step_cost.py") -> str:
    """The launcher command that reproduces this run (the launcher's own ``--local_rank`` left out)."""
    options = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    return " ".join(["deepspeed", "--num_gpus", str(world_size), script, *options])


def heading(title: str, world_size: int, script: str, setup: str, command: str | None = None) -> list[str]:
    """A report's first lines: its title, the command that reproduces it, and how it was set up.
    ``command``, when given, replaces the launcher command (a benchmark that starts its launchers itself)."""
    return [f"# {title}", "", f"Command: `{command or command_line(world_size, script)}`", "", setup, ""]


def device_note() -> str:
    """What ran the benchmark: CPU + gloo, or the GPU model + NCCL."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} + NCCL (torch {torch.__version__})"
    return "CPU + gloo"
