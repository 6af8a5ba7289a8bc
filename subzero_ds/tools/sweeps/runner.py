"""Runs the cells of a sweep: locally one after another through the launcher, or as a slurm job array.

Layout of a sweep directory::

    DIR/sweep.json                 the sweep file as run
    DIR/cells/<hash>/cell.json     the resolved cell (method, seed, lr, batch, task, args, config)
    DIR/cells/<hash>/ds.json       its DeepSpeed config
    DIR/cells/<hash>/log.txt       the run's output
    DIR/cells/<hash>/run/          subzero-train's --output_dir (metrics.jsonl, eval_results.json, checkpoints/)
    DIR/report/                    the report (subzero-sweep report DIR)

A cell is finished when ``run/eval_results.json`` exists: it is never run again. An interrupted
ZO cell continues from its newest checkpoint (``--save_steps``); a first-order one starts over.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ...config import ConfigError
from ...config.subzero import drop_other_methods_keys
from .spec import Cell, Sweep

REPO = Path(__file__).resolve().parents[3]


def cell_dir(root: Path, cell: Cell) -> Path:
    return root / "cells" / cell.hash


def is_finished(root: Path, cell: Cell) -> bool:
    """Whether the cell completed (its eval_results.json exists)."""
    return (cell_dir(root, cell) / "run" / "eval_results.json").is_file()


def run_config(deepspeed: dict) -> dict:
    """A cell's DeepSpeed config as its run reads it: the sweep's shared ``"subzero"`` settings that belong to
    other methods (SubZero's ``rank`` in a MeZO cell) are left out of the cell's section."""
    if "subzero" not in deepspeed:
        return deepspeed
    return {**deepspeed, "subzero": drop_other_methods_keys(deepspeed["subzero"])}


def prepare(root: Path, sweep: Sweep, cells: list[Cell]) -> None:
    """Write the sweep file and every cell's resolved run into ``root``."""
    (root / "cells").mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(sweep.model_dump_json(indent=2))
    for cell in cells:
        directory = cell_dir(root, cell)
        directory.mkdir(exist_ok=True)
        (directory / "cell.json").write_text(cell.model_dump_json(indent=2))
        if cell.deepspeed is not None:
            (directory / "ds.json").write_text(json.dumps(run_config(cell.deepspeed), indent=2))


def train_arguments(root: Path, cell: Cell) -> list[str]:
    """The ``subzero-train`` arguments of a cell (continuing from a checkpoint when it has one)."""
    directory = cell_dir(root, cell)
    args = {**cell.args, "output_dir": str(directory / "run")}
    if cell.deepspeed is not None:
        args["deepspeed_config"] = str(directory / "ds.json")
    if cell.optimizer == "zo":
        args.setdefault("save_steps", max(1, min(cell.steps, 10**9) // 4))
        args.setdefault("save_total_limit", 1)  # only the newest checkpoint is needed, to continue an interrupted cell
        if any((directory / "run" / "checkpoints").glob("checkpoint-*/manifest.json")):
            args["resume"] = True
    flags = []
    for key, value in args.items():
        if value is True:
            flags.append(f"--{key}")
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            flags += [f"--{key}", *map(str, value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def launch_command(sweep: Sweep) -> list[str]:
    """How each cell starts: the launcher a user would use, from this interpreter's environment."""
    bin_dir = Path(sys.executable).parent
    ranks = sweep.launcher.ranks
    if sweep.launcher.kind == "deepspeed":
        from ...distributed import free_port

        return [str(bin_dir / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
                "--module", "subzero_ds.train"]
    if sweep.launcher.kind == "mpirun":
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            raise ConfigError('`launcher.kind` is "mpirun", but mpirun is not on PATH: install Open MPI or use "deepspeed".')
        return [mpirun, "--allow-run-as-root", "-np", str(ranks), sys.executable, "-m", "subzero_ds.train"]
    return [sys.executable, "-m", "subzero_ds.train"]


def run_local(root: Path, sweep: Sweep, cells: list[Cell], log=print) -> list[Cell]:
    """Run every unfinished cell, one after another; returns the cells that failed.

    Prints a progress line per cell with the overall ETA (mean time of the cells run so far).
    """
    prepare(root, sweep, cells)
    todo = [c for c in cells if not is_finished(root, c)]
    log(f"sweep {sweep.name}: {len(cells)} cells, {len(cells) - len(todo)} finished, {len(todo)} to run")
    failed, spent = [], []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    for index, cell in enumerate(todo, 1):
        directory = cell_dir(root, cell)
        command = [*launch_command(sweep), *train_arguments(root, cell)]
        started = time.perf_counter()
        with open(directory / "log.txt", "a") as output:
            output.write(f"$ {shlex.join(command)}\n")
            output.flush()
            done = subprocess.run(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        spent.append(time.perf_counter() - started)
        eta = sum(spent) / len(spent) * (len(todo) - index)
        status = "done" if done.returncode == 0 and is_finished(root, cell) else f"FAILED (exit {done.returncode})"
        if not status.startswith("done"):
            failed.append(cell)
        log(f"[{index}/{len(todo)}] {cell.label} ({cell.hash}): {status} in {spent[-1]:.0f} s; ETA {_duration(eta)}")
    return failed


def write_slurm(root: Path, sweep: Sweep, cells: list[Cell], partition: str | None = None,
                time_limit: str = "24:00:00") -> Path:
    """A slurm job array with one unfinished cell per task (``sbatch DIR/slurm/sweep.sbatch``)."""
    prepare(root, sweep, cells)
    todo = [c for c in cells if not is_finished(root, c)]
    slurm = root / "slurm"
    slurm.mkdir(exist_ok=True)
    (slurm / "cells.txt").write_text("".join(f"{c.hash}\n" for c in todo))
    ranks = sweep.launcher.ranks
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=subzero-{sweep.name}",
        f"#SBATCH --array=0-{max(0, len(todo) - 1)}",
        "#SBATCH --nodes=1",
        f"#SBATCH --ntasks-per-node={ranks}",
        f"#SBATCH --gpus-per-node={ranks}",
        f"#SBATCH --time={time_limit}",
        f"#SBATCH --output={slurm}/%A_%a.log",
        *([f"#SBATCH --partition={partition}"] if partition else []),
        "set -euo pipefail",
        f'CELL=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {slurm / "cells.txt"})',
        f"cd {REPO}",
        "export MASTER_ADDR=$(hostname) MASTER_PORT=$((20000 + SLURM_ARRAY_TASK_ID % 10000))",
        f'srun {sys.executable} -m subzero_ds.tools.sweeps run-cell {root} "$CELL"',
    ]
    script = slurm / "sweep.sbatch"
    script.write_text("\n".join(lines) + "\n")
    return script


def run_cell(root: Path, cell_hash: str) -> None:
    """Run one prepared cell in this process (a slurm task: srun starts one per rank)."""
    cell = Cell.model_validate_json((root / "cells" / cell_hash / "cell.json").read_text())
    from ...train import main

    main(train_arguments(root, cell))


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"
