"""Claim: the LM loss never holds a large vocabulary's logits whole, through the CLI, in place and fused.

A tiny LLaMA (2 layers, width 64) is trained for 2 ZO steps by ``python -m subzero_ds.train`` (1 rank,
ZeRO-3, fp32) on a custom prompt/completion task of 8 rows × 256 tokens, once with a 512-token
vocabulary and once with a 131,072-token one. Whole fp32 logits of that batch would be
8 × 256 × 131,072 × 4 B = 1 GiB (and Hugging Face's loss upcasts and log-softmaxes a copy more);
the loss scored a chunk of rows at a time inside the LM head holds 16 MiB of them. The table is the
peak RSS of each run and the difference the vocabulary makes (target: ≤ 400 MiB).

    .venv/bin/python bench/big_vocab_loss.py [--output bench/results/big_vocab_loss.md]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny models of the tests

from helpers.tiny import tiny_model, tiny_tokenizer  # noqa: E402

VOCABULARIES = (512, 131_072)
ROWS, TOKENS = 8, 256
TARGET_MIB = 400


def write_model(directory: Path, vocab: int, texts: list[str]) -> None:
    tokenizer = tiny_tokenizer(texts)
    model = tiny_model("llama", vocab=vocab)
    model.config.update({"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2})
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def write_task(directory: Path) -> list[str]:
    words = [f"w{i}" for i in range(300)]
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choice(words) for _ in range(TOKENS)), "completion": " w1 w2"} for _ in range(ROWS)]
    for split in ("train", "val"):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [r["prompt"] for r in rows]


def run(model: Path, data: Path, output: Path, fused: bool) -> float:
    config = {"train_micro_batch_size_per_gpu": ROWS, "zero_optimization": {"stage": 3},
              "subzero": {"method": "subzero", "lr": 1e-5, "rank": 8, "fused": fused}}
    config_file = output.with_suffix(".json")
    config_file.write_text(json.dumps(config))
    command = [sys.executable, "-m", "subzero_ds.train", "--deepspeed_config", str(config_file),
               "--model_name_or_path", str(model), "--task", "custom", "--data_dir", str(data),
               "--max_length", str(TOKENS), "--max_steps", "2", "--num_eval", "1", "--max_new_tokens", "1",
               "--eval_batch_size", "1", "--output_dir", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return json.loads((output / "eval_results.json").read_text())["peak_rss_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/big_vocab_loss.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        texts = write_task(scratch)
        peaks = {}
        for vocab in VOCABULARIES:
            write_model(scratch / f"llama-{vocab}", vocab, texts)
            for fused in (False, True):
                peaks[vocab, fused] = run(scratch / f"llama-{vocab}", scratch, scratch / f"out-{vocab}-{fused}", fused)
    lines = ["# Peak RSS of a ZO step's LM loss: 512 vs 131,072-token vocabulary", "",
             f"`{' '.join(['python', 'bench/big_vocab_loss.py'])}`: tiny LLaMA (2 layers, width 64), 1 rank, ZeRO-3, "
             f"fp32, SubZero, {ROWS} rows × {TOKENS} tokens, custom prompt/completion task, 2 steps through "
             "`python -m subzero_ds.train`.", "",
             "| mode | peak RSS, vocab 512 (MiB) | peak RSS, vocab 131,072 (MiB) | added (MiB) | target |",
             "|---|---|---|---|---|"]
    for fused in (False, True):
        small, big = peaks[VOCABULARIES[0], fused], peaks[VOCABULARIES[1], fused]
        verdict = "met" if big - small <= TARGET_MIB else "missed"
        lines.append(f"| {'fused' if fused else 'in place'} | {small:.0f} | {big:.0f} | {big - small:.0f} | "
                     f"≤ {TARGET_MIB}: {verdict} |")
    report = "\n".join(lines) + "\n"
    print(report)
    args.output.write_text(report)


if __name__ == "__main__":
    main()
