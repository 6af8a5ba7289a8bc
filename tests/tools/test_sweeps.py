"""subzero-sweep: grid expansion, hashing, budgets, slurm script, statistics, report, resumable runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from subzero_ds.config import ConfigError
from subzero_ds.tools.sweeps import expand, load_sweep
from subzero_ds.tools.sweeps.report import collect, group_statistics, relative_improvement, write_report
from subzero_ds.tools.sweeps.runner import cell_dir, prepare, run_local, train_arguments, write_slurm
from subzero_ds.tools.sweeps.spec import Sweep

REPO = Path(__file__).resolve().parents[2]


def sweep(**changes) -> Sweep:
    raw = {
        "name": "t", "args": {"task": "sst2", "model_name_or_path": "m"},
        "deepspeed": {"zero_optimization": {"stage": 3}, "subzero": {"lr": 1e-5}},
        "grid": {"methods": {"mezo": {"subzero": {"method": "mezo"}}, "subzero": {},
                             "hizoo": {"subzero": {"method": "hizoo"}}, "q2": {"subzero": {"queries": 2}},
                             "adamw": {"optimizer": "adamw", "args": {"tuning": "lora"}}},
                 "seeds": [0, 1], "batch_sizes": [8, 16]},
        "budget": {"forwards": 120}, "baseline": "mezo", "launcher": {"kind": "python", "ranks": 2},
    }
    raw.update(changes)
    return Sweep.model_validate(raw)


def test_the_grid_expands_to_every_combination_with_stable_distinct_hashes():
    cells = expand(sweep())
    assert len(cells) == 5 * 2 * 2
    assert len({c.hash for c in cells}) == len(cells)
    first_seed = cells[: len(cells) // 2]  # seed-major: a sweep cut short has every method on seed 0
    assert {c.seed for c in first_seed} == {cells[0].seed} and {c.method for c in first_seed} == {c.method for c in cells}
    assert [c.hash for c in expand(sweep())] == [c.hash for c in cells]  # stable across processes and runs
    changed = expand(sweep(deepspeed={"zero_optimization": {"stage": 3}, "subzero": {"lr": 2e-5}}))
    assert not {c.hash for c in changed if c.optimizer == "zo"} & {c.hash for c in cells}


def test_budgets_count_forward_passes_per_method():
    steps = {(c.method, c.batch_size): c.steps for c in expand(sweep())}
    assert steps["mezo", 8] == 60 and steps["subzero", 16] == 60  # two-point: 2 forwards a step
    assert steps["hizoo", 8] == 40 and steps["adamw", 8] == 40  # three forwards; forward + backward counted as 3
    assert steps["q2", 8] == 30  # two queries: 4 forwards
    cell = next(c for c in expand(sweep()) if c.method == "subzero" and c.batch_size == 16 and c.seed == 1)
    assert cell.args["per_device_batch_size"] == 8 and cell.args["seed"] == 1 and cell.deepspeed["subzero"]["seed"] == 1
    fixed = expand(sweep(budget={"steps": 7}))
    assert {c.steps for c in fixed} == {7}
    timed = expand(sweep(budget={"seconds": 30}))
    assert all(c.args["max_train_seconds"] == 30 for c in timed)


def test_a_first_order_cell_gets_deepspeeds_optimizer_not_our_section():
    cell = next(c for c in expand(sweep(grid={"methods": {"adamw": {"optimizer": "adamw"}}, "lrs": [1e-4]},
                                        baseline=None)))
    assert cell.args["optimizer"] == "adamw" and cell.args["learning_rate"] == 1e-4 and "subzero" not in cell.deepspeed


@pytest.mark.parametrize("change,key", [
    ({"budget": {"forwards": 10, "steps": 5}}, "budget"),
    ({"baseline": "nosuch"}, "baseline"),
    ({"grid": {"methods": {}}}, "grid.methods"),
    ({"grid": {"methods": {"m": {"optimiser": "zo"}}}}, "grid.methods.m.optimiser"),
    ({"launcher": {"kind": "srun"}}, "launcher.kind"),
])
def test_a_bad_sweep_file_names_the_key(tmp_path, change, key):
    raw = json.loads(sweep().model_dump_json())
    raw.update(change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as caught:
        load_sweep(path)
    assert f"`{key}" in str(caught.value) and str(path) in str(caught.value)


def test_a_batch_that_does_not_divide_over_the_ranks_is_refused():
    with pytest.raises(ConfigError, match="does not divide"):
        expand(sweep(grid={"methods": {"m": {}}, "batch_sizes": [3]}, baseline=None))


def test_the_slurm_array_has_one_unfinished_cell_per_task(tmp_path):
    spec = sweep()
    cells = expand(spec)
    prepare(tmp_path, spec, cells)
    (cell_dir(tmp_path, cells[0]) / "run").mkdir()
    (cell_dir(tmp_path, cells[0]) / "run" / "eval_results.json").write_text("{}")  # finished: left out
    script = write_slurm(tmp_path, spec, cells, partition="gpu").read_text()
    assert f"#SBATCH --array=0-{len(cells) - 2}" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --gpus-per-node=2" in script
    assert "srun " in script and "-m subzero_ds.tools.sweeps run-cell" in script
    listed = (tmp_path / "slurm" / "cells.txt").read_text().split()
    assert listed == [c.hash for c in cells[1:]]


def test_a_zo_cell_resumes_from_its_newest_checkpoint(tmp_path):
    spec = sweep()
    cell = next(c for c in expand(spec) if c.optimizer == "zo")
    prepare(tmp_path, spec, [cell])
    assert "--resume" not in train_arguments(tmp_path, cell)
    checkpoint = cell_dir(tmp_path, cell) / "run" / "checkpoints" / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "manifest.json").write_text("{}")
    assert "--resume" in train_arguments(tmp_path, cell)


def fake_cells(root: Path, values: dict[str, list[float]], task: str = "sst2") -> None:
    spec = sweep(grid={"methods": {m: {} if m != "mezo" else {"subzero": {"method": "mezo"}} for m in values},
                       "seeds": [0, 1, 2], "batch_sizes": [16]}, baseline="mezo")
    cells = [c for c in expand(spec)]
    prepare(root, spec, cells)
    for cell in cells:
        run = cell_dir(root, cell) / "run"
        run.mkdir(exist_ok=True)
        value = values[cell.method][cell.seed]
        results = {"final": {"accuracy": value}, "zero_shot": {"accuracy": 0.5}, "steps": cell.steps,
                   "train_seconds": 10.0 * cell.steps, "peak_rss_mib": 1000.0 + 10 * len(cell.method)}
        (run / "eval_results.json").write_text(json.dumps(results))
        rows = [{"step": 0, "eval_accuracy": 0.5}, {"step": cell.steps // 2, "eval_accuracy": (0.5 + value) / 2},
                {"step": cell.steps, "eval_accuracy": value}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_statistics_equal_hand_computed_values(tmp_path):
    fake_cells(tmp_path, {"mezo": [0.70, 0.72, 0.74], "subzero": [0.80, 0.82, 0.84]})
    from subzero_ds.tools.sweeps.report import collect

    cells, _ = collect(tmp_path)
    groups = group_statistics(cells, "mezo").set_index("method")
    row = groups.loc["subzero"]
    assert row["mean"] == pytest.approx(0.82) and row["std"] == pytest.approx(0.02) and row["n"] == 3
    # 95% CI: mean ± t(0.975, 2)·s/√3 with t(0.975, 2) = 4.302653
    assert row["ci95_high"] - row["mean"] == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)
    # Welch: t = (0.82 − 0.72) / √(0.02²/3 + 0.02²/3) = 6.12372, df = 4 (equal variances and n):
    # p = 2·(1 − F_t4(6.12372)) = 0.0036022
    assert row["p_value"] == pytest.approx(0.0036022, rel=1e-3)
    assert row["paired_difference"] == pytest.approx(0.10)
    improvement = relative_improvement(cells, "mezo")
    assert improvement.loc["subzero", "relative_improvement"] == pytest.approx(0.10 / 0.72)


def test_the_report_writes_tables_and_non_empty_plots(tmp_path):
    fake_cells(tmp_path, {"mezo": [0.70, 0.72, 0.74], "subzero": [0.80, 0.82, 0.84], "adam": [0.75, 0.70, 0.80]})
    report = write_report(tmp_path, expected_cells=9).read_text()
    assert "9 of 9 cells finished" in report and "| sst2 | subzero |" in report and "p vs mezo" in report
    for name in ("cells.csv", "groups.csv", "metric_vs_forwards.png", "metric_vs_seconds.png", "metric_vs_step.png",
                 "peak_memory.png"):
        assert (tmp_path / "report" / name).stat().st_size > 100, name


def test_a_partial_sweep_reports_what_finished(tmp_path):
    fake_cells(tmp_path, {"mezo": [0.70, 0.72, 0.74], "subzero": [0.80, 0.82, 0.84]})
    victim = next((tmp_path / "cells").glob("*/run/eval_results.json"))
    victim.unlink()
    assert "5 of 6 cells finished" in write_report(tmp_path, expected_cells=6).read_text()


def test_a_cell_resumed_from_an_old_checkpoint_is_flagged_as_estimated_time(tmp_path):
    fake_cells(tmp_path, {"mezo": [0.70, 0.72, 0.74], "subzero": [0.80, 0.82, 0.84]})
    resumed = next((tmp_path / "cells").glob("*/run/eval_results.json"))
    resumed.write_text(json.dumps({**json.loads(resumed.read_text()), "train_seconds_estimated": True}))
    report = write_report(tmp_path).read_text()
    assert f"Training seconds estimated for {resumed.parent.parent.name}:" in report
    assert report.count("estimated for") == 1
    older = json.loads(resumed.read_text())  # an older run's results: no resumed_at_step, 1/4 of the steps timed
    older.pop("train_seconds_estimated")
    resumed.write_text(json.dumps({**older, "trained_steps": older["steps"] // 4}))
    cells, _ = collect(tmp_path)
    row = cells[cells["cell"] == resumed.parent.parent.name].iloc[0]
    assert row["train_seconds_estimated"] and row["train_seconds"] == 4 * older["train_seconds"]


TEXTS = ["a great and moving film", "a dull and boring mess", "the best movie this year", "the worst movie this year"]


def test_a_tiny_sweep_runs_and_an_interrupted_one_continues_without_rerunning(tmp_path):
    """The CPU-sized example: a tiny LLaMA, 2 methods × 2 seeds, 1 rank; then one cell is lost and rerun alone."""
    from helpers.tiny import save_tiny_pretrained

    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(TEXTS * 4)))
    save_tiny_pretrained(tmp_path / "llama", "llama", TEXTS * 5 + ["It was great terrible"] * 5)
    spec = Sweep.model_validate({
        "name": "tiny", "args": {"model_name_or_path": str(tmp_path / "llama"), "task": "sst2",
                                 "train_file": str(tmp_path / "train.tsv"), "validation_file": str(tmp_path / "train.tsv"),
                                 "train_as_classification": True, "max_length": 32, "log_steps": 2},
        "deepspeed": {"zero_optimization": {"stage": 0}, "subzero": {"lr": 1e-3, "eps": 1e-3, "rank": 4}},
        "grid": {"methods": {"mezo": {"subzero": {"method": "mezo"}}, "subzero": {}}, "seeds": [0, 1],
                 "batch_sizes": [4]},
        "budget": {"forwards": 12}, "baseline": "mezo", "launcher": {"kind": "python", "ranks": 1}})
    root = tmp_path / "sweep"
    cells = expand(spec)
    messages: list[str] = []
    assert run_local(root, spec, cells, log=messages.append) == []
    assert all((cell_dir(root, c) / "run" / "eval_results.json").is_file() for c in cells)
    assert "ETA" in messages[-1]
    lost = cells[2]
    (cell_dir(root, lost) / "run" / "eval_results.json").unlink()  # as if the sweep had been killed during it
    messages.clear()
    assert run_local(root, spec, cells, log=messages.append) == []
    assert messages[0].endswith("3 finished, 1 to run") and lost.hash in messages[1]
    runs = {c.hash: (cell_dir(root, c) / "log.txt").read_text().count("$ ") for c in cells}
    assert runs == {c.hash: 2 if c is lost else 1 for c in cells}
    report = write_report(root, "mezo", len(cells)).read_text()
    assert "4 of 4 cells finished" in report


SHIPPED_SWEEPS = {"smollm2_sst2.json": "smollm2-sst2", "adam_lr_grid.json": "adam-lr-grid"}


@pytest.mark.parametrize("spec, results", SHIPPED_SWEEPS.items())
def test_every_shipped_sweep_resolves_to_its_committed_finished_cells(spec, results):
    """The published tables stay reproducible: each shipped spec's cells (by hash) are the ones committed,
    every one finished, with the DeepSpeed config its run read (cells run before other methods' keys were left
    out of ds.json kept them: the same run once they are left out)."""
    from subzero_ds.tools.sweeps.runner import is_finished, run_config

    repo = Path(__file__).resolve().parents[2]
    root = repo / "sweeps" / "results" / results
    cells = expand(load_sweep(repo / "sweeps" / spec))
    assert {cell.hash for cell in cells} == {p.name for p in (root / "cells").iterdir()}
    for cell in cells:
        assert is_finished(root, cell), cell.label
        if cell.deepspeed is not None:
            committed = json.loads((cell_dir(root, cell) / "ds.json").read_text())
            assert run_config(committed) == run_config(cell.deepspeed), cell.label
