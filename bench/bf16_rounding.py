"""How much of a bf16 ZO update survives rounding: nearest vs seeded stochastic rounding.

Run from the repository root (1 process, ZeRO-0; set-up done by ``make setup``):

    .venv/bin/python bench/bf16_rounding.py --data ../shared/data/sst2       # ~15 min on 2 cores

SmolLM2-135M-Instruct (``smollm2-135m``) in bf16, full fine-tuning with SubZero on SST-2 (the
classification loss over " terrible"/" great", global batch 16), at each ``--lr`` (default: the
published full fine-tuning 1e-6, and 1e-5 as in ``make demo``), with ``"update_rounding"``
``nearest`` and ``stochastic``, the same data, seed and directions. It reports:

- **changed fraction**: the share of trainable elements whose stored bf16 value the update of a
  step changed (in-place mode: the weights after the update against the backup the update was
  computed from), mean over the steps;
- the loss curve: the training loss (ℓ+ + ℓ−)/2 in windows of 10 steps, and the classification
  loss and accuracy on ``--num_eval`` held-out validation sentences before and after.

Writes ``--output`` (default ``bench/results/bf16_rounding.md``) and prints it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import subzero_ds
from subzero_ds.train import pretrained
from subzero_ds.tasks.encoding import SampleEncoder, candidate_batch, candidate_scores, classification_loss
from subzero_ds.tasks import get_task, load_samples
from subzero_ds.train import TaskBatches


def changed_fraction(engine: subzero_ds.SubZeroEngine) -> float:
    """The share of the trainable elements whose stored value the last step's update changed.

    In-place probing backs θ up before the probes and the update is computed from that backup
    (``engine.probes.theta``), which still holds θ before the update when the step returns.
    """
    backups = engine.probes.theta.local
    changed = sum(int((shard.local() != backups[i]).sum()) for i, shard in enumerate(engine.shards))
    return changed / sum(shard.local_numel for shard in engine.shards)


def evaluate(engine, samples, encoder, batch_size: int = 16) -> tuple[float, float]:
    """(mean classification loss, accuracy) on ``samples``."""
    losses, correct = [], 0
    for start in range(0, len(samples), batch_size):
        batch = candidate_batch(samples[start : start + batch_size], encoder)
        with torch.no_grad():
            scores = candidate_scores(engine.module, batch)
            losses.append(float(classification_loss(engine.module, batch)) * len(batch["gold"]))
        correct += int((scores.argmax(1) == batch["gold"]).sum())
    return sum(losses) / len(samples), correct / len(samples)


def run(args: argparse.Namespace, lr: float, rounding: str, model_path: Path, tokenizer, train, held_out) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, attn_implementation="sdpa")
    config = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 0},
              "subzero": {"method": "subzero", "lr": lr, "eps": 1e-3, "rank": 24, "subspace_interval": 1000,
                          "seed": 0, "update_rounding": rounding}}
    encoder = SampleEncoder(tokenizer, 64)
    engine = subzero_ds.initialize(model=model, config=config, loss_fn=classification_loss)
    before = evaluate(engine, held_out, encoder)
    batches = TaskBatches(train, 16, seed=0)
    losses, fractions, started = [], [], time.perf_counter()
    for step in range(args.steps):
        result = engine.step(candidate_batch(batches.at(step), encoder))
        losses.append(result.loss)
        if result.updated and not result.skipped:
            fractions.append(changed_fraction(engine))
    seconds = time.perf_counter() - started
    after = evaluate(engine, held_out, encoder)
    return {"lr": lr, "rounding": rounding, "fractions": fractions, "losses": losses, "before": before,
            "after": after, "seconds": seconds}


def report(rows: list[dict], args: argparse.Namespace) -> str:
    windows = range(0, args.steps, 10)
    lines = [
        "# bf16 updates: how much survives rounding (`bench/bf16_rounding.py`)",
        "",
        f"Command: `.venv/bin/python bench/bf16_rounding.py --data {args.data} --lr {' '.join(map(str, args.lr))} "
        f"--steps {args.steps} --num_eval {args.num_eval}`",
        "",
        "SmolLM2-135M-Instruct in bf16, full fine-tuning, SubZero (r = 24, ε = 1e-3), SST-2 classification loss, "
        f"global batch 16, {args.steps} steps, ZeRO-0 on 1 process. Changed fraction: the share of the 134.5M "
        "trainable elements whose stored bf16 value the step's update changed (mean over steps [min–max]). "
        f"Held-out: {args.num_eval} SST-2 validation sentences (classification loss, accuracy).",
        "",
        "| lr | update rounding | changed fraction per update | held-out loss before → after | accuracy before → after "
        "| train loss, mean of steps " + ", ".join(f"{w + 1}–{min(w + 10, args.steps)}" for w in windows) + " | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["fractions"]
        curve = ", ".join(f"{statistics.mean(r['losses'][w : w + 10]):.4f}" for w in windows)
        lines.append(
            f"| {r['lr']:g} | {r['rounding']} | {statistics.mean(f):.2e} [{min(f):.1e}–{max(f):.1e}] "
            f"| {r['before'][0]:.4f} → {r['after'][0]:.4f} | {r['before'][1]:.3f} → {r['after'][1]:.3f} "
            f"| {curve} | {r['seconds'] / args.steps:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/sst2"))
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-6, 1e-5])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--num_eval", type=int, default=128)
    parser.add_argument("--output", type=Path, default=Path("bench/results/bf16_rounding.md"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model_path = pretrained.materialize_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    task = get_task("sst2")
    train = load_samples(task, "train", data_dir=args.data, limit=1000, seed=0)
    # test.tsv here is the GLUE SST-2 validation set (../shared/data/README.md)
    held_out = load_samples(task, "validation", file=args.data / "test.tsv", limit=args.num_eval, seed=0)
    rows = [run(args, lr, rounding, model_path, tokenizer, train, held_out)
            for lr in args.lr for rounding in ("nearest", "stochastic")]
    text = report(rows, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
