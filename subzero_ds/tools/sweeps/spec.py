"""The sweep file: base run, grid, budget; its expansion into cells, each with a resolved run and a hash.

A cell is one training run: a method × seed × learning rate × global batch × task of the grid,
resolved to the exact ``subzero-train`` arguments and DeepSpeed config it runs with. Its hash
(of that resolution) names its directory, so a finished cell is never run again, and changing
anything that affects a run makes a new cell.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ...config import ConfigError


class MethodSpec(BaseModel):
    """One method of the grid: overrides of the ``"subzero"`` section and of the CLI arguments."""

    model_config = ConfigDict(extra="forbid")
    optimizer: Literal["zo", "adamw", "sgd"] = Field("zo", description='"zo" (the subzero section) or a first-order baseline.')
    subzero: dict[str, Any] = Field(default_factory=dict, description='Keys merged into the "subzero" section.')
    args: dict[str, Any] = Field(default_factory=dict, description="subzero-train arguments (flag names without --).")


class TaskSpec(BaseModel):
    """One task of the grid: subzero-train's --task and its data arguments."""

    model_config = ConfigDict(extra="forbid")
    task: str
    args: dict[str, Any] = Field(default_factory=dict, description="Data arguments, e.g. data_dir, test_file.")


class Budget(BaseModel):
    """The equal budget of every cell: exactly one of forward passes, steps or wall-clock seconds."""

    model_config = ConfigDict(extra="forbid")
    forwards: int | None = Field(None, ge=1, description="Forward passes over the global batch per cell.")
    steps: int | None = Field(None, ge=1, description="Optimizer steps per cell.")
    seconds: float | None = Field(None, gt=0, description="Training wall-clock seconds per cell.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "Budget":
        given = [k for k in ("forwards", "steps", "seconds") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"`budget` needs exactly one of forwards, steps, seconds; got {given or 'none'}")
        return self


class Grid(BaseModel):
    """What varies between cells."""

    model_config = ConfigDict(extra="forbid")
    methods: dict[str, MethodSpec] = Field(min_length=1, description="name -> method.")
    seeds: list[int] = Field([0], min_length=1, description="Run seeds (data order and the ZO seed).")
    lrs: list[float] | None = Field(None, min_length=1, description="Learning rates (subzero.lr, or --learning_rate).")
    batch_sizes: list[int] = Field([16], min_length=1, description="Global batch sizes (divided over the ranks).")
    tasks: list[TaskSpec] | None = Field(None, min_length=1, description="Tasks; default: the base args' task.")


class Launcher(BaseModel):
    """How a cell runs locally: one rank per process, like a user would launch it."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["deepspeed", "mpirun", "python"] = "deepspeed"
    ranks: int = Field(2, ge=1)


class Sweep(BaseModel):
    """A sweep file (JSON)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    args: dict[str, Any] = Field(default_factory=dict, description="subzero-train arguments every cell shares.")
    deepspeed: dict[str, Any] = Field(description='The DeepSpeed config every cell starts from (with a "subzero" section).')
    grid: Grid
    budget: Budget
    baseline: str | None = Field(None, description="The method the report compares the others to.")
    launcher: Launcher = Field(default_factory=Launcher)
    evaluations: int = Field(4, ge=1, description="Evaluations during a cell (for the curves), the last at its end.")
    first_order_forwards_per_step: float = Field(
        3.0, gt=0, description="What a first-order step counts as in forward passes (a forward plus a backward ≈ 2).")

    @model_validator(mode="after")
    def _baseline_known(self) -> "Sweep":
        if self.baseline is not None and self.baseline not in self.grid.methods:
            raise ValueError(f"`baseline` is {self.baseline!r}, not a method of `grid.methods` "
                             f"({', '.join(self.grid.methods)}): name one of them")
        return self


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and validate a sweep file.

    Raises:
        ConfigError: missing/invalid JSON or a bad key, each problem naming the key and the fix.
    """
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep file {os.fspath(path)!r} does not exist: pass the path of a JSON sweep file "
                          "(see sweeps/example_tiny.json).") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"sweep file {os.fspath(path)!r} is not valid JSON: {e.msg} at line {e.lineno}.") from None
    try:
        return Sweep.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(the whole file)"
            problems.append(f"`{key}`: {err['msg']} (got {str(err.get('input'))[:60]!r})")
        raise ConfigError(f"found the following errors in sweep file {os.fspath(path)!r}:\n"
                          + "\n".join(f"  - {p}" for p in problems)) from None


class Cell(BaseModel):
    """One run of the sweep, resolved."""

    model_config = ConfigDict(frozen=True)
    method: str
    seed: int
    lr: float | None
    batch_size: int
    task: str
    optimizer: str
    steps: int
    forwards_per_step: float
    args: dict[str, Any]
    deepspeed: dict[str, Any] | None

    @property
    def hash(self) -> str:
        """12 hex digits of the SHA-256 of the resolved run (method name, arguments, config): two methods of a
        grid with the same settings stay two cells."""
        payload = json.dumps({"method": self.method, "args": self.args, "deepspeed": self.deepspeed}, sort_keys=True,
                             default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        lr = f" lr {self.lr:g}" if self.lr is not None else ""
        return f"{self.method} seed {self.seed}{lr} batch {self.batch_size} {self.task}"


def forwards_per_step(sweep: Sweep, method: MethodSpec) -> float:
    """What one step of ``method`` costs in forward passes over the global batch.

    ZO: its probes, as the method's registered estimator takes them (two-point: 2 per query, HiZOO 3);
    first-order: ``first_order_forwards_per_step``.
    """
    if method.optimizer != "zo":
        return sweep.first_order_forwards_per_step
    from ...methods import registry

    section = {**sweep.deepspeed.get("subzero", {}), **method.subzero}
    spec = registry.method(section.get("method", "subzero"))
    return float(spec.forwards_per_step(int(section.get("queries", 1))))


def expand(sweep: Sweep) -> list[Cell]:
    """Every cell of the grid, in a stable order: seed outermost, then method, task, lr, batch — so a
    sweep cut short has every method on its first seeds, not all seeds of the first methods.

    Raises:
        ConfigError: a global batch that does not divide over the ranks.
    """
    tasks = sweep.grid.tasks or [TaskSpec(task=str(sweep.args.get("task", "sst2")))]
    cells = []
    for seed, (name, method), task, lr, batch in itertools.product(
            sweep.grid.seeds, sweep.grid.methods.items(), tasks, sweep.grid.lrs or [None], sweep.grid.batch_sizes):
        if batch % sweep.launcher.ranks:
            raise ConfigError(f"`grid.batch_sizes` has {batch}, which does not divide over `launcher.ranks` = "
                              f"{sweep.launcher.ranks}: use a multiple of {sweep.launcher.ranks}.")
        per_step = forwards_per_step(sweep, method)
        budget = sweep.budget
        steps = budget.steps or (max(1, int(budget.forwards // per_step)) if budget.forwards else 10**9)
        args = {**sweep.args, **task.args, **method.args, "task": task.task, "seed": seed,
                "per_device_batch_size": batch // sweep.launcher.ranks, "max_steps": steps}
        if budget.seconds:
            args["max_train_seconds"] = budget.seconds
        else:
            args["eval_steps"] = max(1, math.ceil(steps / sweep.evaluations))
        deepspeed = None
        if method.optimizer == "zo":
            deepspeed = copy.deepcopy(sweep.deepspeed)
            deepspeed["subzero"] = {**deepspeed.get("subzero", {}), **method.subzero, "seed": seed}
            if lr is not None:
                deepspeed["subzero"]["lr"] = lr
        else:
            args["optimizer"] = method.optimizer
            deepspeed = {k: v for k, v in sweep.deepspeed.items() if k != "subzero"}
            if lr is not None:
                args["learning_rate"] = lr
        cells.append(Cell(method=name, seed=seed, lr=lr, batch_size=batch, task=task.task, optimizer=method.optimizer,
                          steps=steps, forwards_per_step=per_step, args=args, deepspeed=deepspeed))
    return cells
