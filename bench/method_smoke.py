"""One real-data smoke run per ZO method: SmolLM2-135M on SST-2, 60 steps, 2 CPU ranks under ZeRO-3.

Run from the repository root (~5 min per method on 2 cores):

    .venv/bin/python bench/method_smoke.py --data ../shared/data/sst2 [--methods subzero hizoo ...]

Each method (every registered method and update rule, ``harness/methods.py``) trains
SmolLM2-135M-Instruct (full fine-tuning, the classification loss over " terrible"/" great", global
batch 16) through ``deepspeed --num_gpus 2 --module subzero_ds.train`` with its shipped config
(``ds_configs/``; a method that ships none: its settings and the defaults) at the demo's learning
rate 1e-5 (1e-6 with momentum, whose effective step is lr / (1 − β)). Reports the training loss in windows of 10 steps,
whether it fell, whether anything was not finite, and the accuracy on ``--num_eval`` validation
sentences before and after. Writes ``--output`` (default ``bench/results/method_smoke.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.methods import update_rule, zo_methods
from harness.report import publish

REPO = Path(__file__).resolve().parents[1]
METHODS = zo_methods()  # every registered method and update rule
LR, MOMENTUM_LR = 1e-5, 1e-6  # for 60 steps; momentum's effective step is lr / (1 − β)


def method_config(method: str) -> dict:
    """The method's shipped config (``ds_configs/zero3_<method>.json``), or, for a method that ships
    none, ZeRO-3 with its ``"subzero"`` settings and the package's defaults for the rest."""
    shipped = REPO / "ds_configs" / f"zero3_{method.replace('-', '_')}.json"
    if shipped.is_file():
        return json.loads(shipped.read_text())
    return {"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 3},
            "subzero": {**METHODS[method], "eps": 1e-3, "seed": 0}}


def run(method: str, args: argparse.Namespace, scratch: Path) -> dict:
    config, lr = method_config(method), MOMENTUM_LR if update_rule(method) == "momentum" else LR
    config["subzero"]["lr"] = lr
    config["train_micro_batch_size_per_gpu"] = 8
    config_path = scratch / f"{method}.json"
    config_path.write_text(json.dumps(config))
    output = args.output_root / method
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--module", "subzero_ds.train",
               "--deepspeed_config", str(config_path), "--model_name_or_path", "smollm2-135m", "--task", "sst2",
               "--data_dir", str(args.data), "--train_as_classification", "--num_train", "1000",
               "--num_eval", str(args.num_eval), "--max_length", "64", "--max_steps", str(args.steps),
               "--log_steps", "1", "--output_dir", str(output)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        return {"method": method, "failed": done.stderr[-1500:]}
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    results = json.loads((output / "eval_results.json").read_text())
    return {"method": method, "lr": lr, "losses": losses, "zero_shot": results["zero_shot"]["accuracy"],
            "final": results["final"]["accuracy"], "seconds_per_step": results["train_seconds"] / results["trained_steps"],
            "wall": time.perf_counter() - started,
            "finite": all(math.isfinite(x) for x in losses) and not any(r.get("skipped") for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/sst2"))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--num_eval", type=int, default=200)
    parser.add_argument("--output_root", type=Path, default=Path("outputs/method_smoke"))
    parser.add_argument("--output", type=Path, default=Path("bench/results/method_smoke.md"))
    args = parser.parse_args()
    args.data = args.data.resolve()
    with tempfile.TemporaryDirectory() as scratch:
        runs = []
        for method in args.methods:  # raw results saved after each method, so a cut-short run keeps what finished
            runs.append(run(method, args, Path(scratch)))
            args.output.with_suffix(".json").parent.mkdir(parents=True, exist_ok=True)
            args.output.with_suffix(".json").write_text(json.dumps(runs, indent=1))
            print(f"{method}: done", flush=True)
    windows = range(0, args.steps, 10)
    lines = ["# One real-data smoke run per ZO method (`bench/method_smoke.py`)", "",
             f"SmolLM2-135M-Instruct, full fine-tuning, SST-2 (1000 training sentences, {args.num_eval} validation), "
             f"classification loss, 2 CPU ranks × 8 = global batch 16, ZeRO-3, fp32, {args.steps} steps, each method's "
             "shipped config at the lr shown. Training loss: mean of each 10-step window.", "",
             "| method | lr | train loss by window | fell? | all finite? | accuracy zero-shot → final | s/step |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        if "failed" in r:
            lines.append(f"| {r['method']} | — | FAILED: {r['failed'][-200:]!r} | | | | |")
            continue
        means = [statistics.mean(r["losses"][w : w + 10]) for w in windows]
        fell = means[-1] < means[0]
        lines.append(f"| {r['method']} | {r['lr']:g} | " + " → ".join(f"{m:.3f}" for m in means)
                     + f" | {'yes' if fell else 'no'} | {'yes' if r['finite'] else 'NO'} | {r['zero_shot']:.3f} → "
                     f"{r['final']:.3f} | {r['seconds_per_step']:.1f} |")
    publish("\n".join(lines) + "\n", args.output, "method_smoke")


if __name__ == "__main__":
    main()
