"""``subzero-sweep``: run a sweep file's grid resumably, and report it.

    subzero-sweep SWEEP.json [--output DIR] [--dry-run] [--slurm [--partition P] [--no-submit]]
    subzero-sweep report DIR [--baseline METHOD]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from ...config import ConfigError
from .runner import is_finished, run_cell, run_local, write_slurm
from .spec import expand, load_sweep


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["report"]:
            report(argv[1:])
        elif argv[:1] == ["run-cell"]:
            run_cell(Path(argv[1]), argv[2])
        else:
            run(argv)
    except ConfigError as error:
        print(f"subzero-sweep: error: {error}", file=sys.stderr)
        sys.exit(2)


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="subzero-sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="the sweep file (JSON)")
    parser.add_argument("--output", type=Path, default=None, help="sweep directory (default: outputs/sweeps/<name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the cells and the budget; run nothing")
    parser.add_argument("--slurm", action="store_true", help="write a slurm job array (one cell per task) and submit it")
    parser.add_argument("--no-submit", action="store_true", help="with --slurm: write the script only")
    parser.add_argument("--partition", default=None, help="with --slurm: the partition")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    cells = expand(sweep)
    root = args.output or Path("outputs/sweeps") / sweep.name
    if args.dry_run:
        for cell in cells:
            state = "finished" if is_finished(root, cell) else "to run"
            print(f"{cell.hash}  {cell.label}: {cell.steps if cell.steps < 10**9 else '∞'} steps × "
                  f"{cell.forwards_per_step:g} forwards ({state})")
        print(f"{len(cells)} cells; budget per cell: {sweep.budget.model_dump(exclude_none=True)}")
        return
    if args.slurm:
        script = write_slurm(root, sweep, cells, args.partition)
        print(f"wrote {script}")
        if not args.no_submit:
            if shutil.which("sbatch") is None:
                raise ConfigError("--slurm: sbatch is not on PATH (no slurm here). Submit the script on the cluster "
                                  f"(sbatch {script}), or pass --no-submit to write it only.")
            subprocess.run(["sbatch", str(script)], check=True)
        return
    failed = run_local(root, sweep, cells)
    from .report import write_report

    print(f"report: {write_report(root, sweep.baseline, len(cells))}")
    if failed:
        raise ConfigError(f"{len(failed)} cell(s) failed: " + "; ".join(
            f"{c.label} (see {root}/cells/{c.hash}/log.txt)" for c in failed) + ". Rerun the sweep to retry them.")


def report(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="subzero-sweep report")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--baseline", default=None)
    args = parser.parse_args(argv)
    if not (args.directory / "cells").is_dir():
        raise ConfigError(f"{args.directory} is not a sweep directory (no cells/): pass the --output of a sweep.")
    from .report import write_report

    print(f"report: {write_report(args.directory, args.baseline)}")


if __name__ == "__main__":
    main()
