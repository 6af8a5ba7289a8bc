"""Training entry point: ``python -m subzero_ds.train`` / ``subzero-train``.

Launch it the way DeepSpeed jobs are launched; every launcher ends in this same module:

    deepspeed --num_gpus 2 --module subzero_ds.train                      # one node, 2 ranks
    mpirun -np 2 python -m subzero_ds.train                               # MPI
    deepspeed --hostfile hosts --module subzero_ds.train --deepspeed_config ds.json   # many nodes

With no arguments it fine-tunes a tiny OPT built offline on a synthetic next-token task (the
README's demo). ``--model_name_or_path`` takes a Hugging Face model directory or hub id.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import deepspeed
import torch

import subzero_ds
from subzero_ds.config import ConfigError, deepspeed_section, load_ds_config, parse_config, zero_stage
from subzero_ds.demo import pattern_batch, rank_slice, tiny_model
from subzero_ds.distributed import exit_process, get_world_size_and_rank, init_distributed, log

DEMO_CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 0},
    "subzero": {"method": "subzero", "lr": 1e-3, "eps": 1e-3, "rank": 8, "subspace_interval": 50, "seed": 0},
}
TINY_MODELS = ("tiny-opt", "tiny-llama")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default="tiny-opt",
                        help="Hugging Face model directory or hub id, or tiny-opt / tiny-llama (built offline).")
    parser.add_argument("--max_steps", type=int, default=600, help="ZO steps to take.")
    parser.add_argument("--per_device_batch_size", type=int, default=8, help="Sequences per rank per step.")
    parser.add_argument("--seq_len", type=int, default=16, help="Tokens per synthetic sequence.")
    parser.add_argument("--eval_steps", type=int, default=100, help="Evaluate (and log) every N steps.")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="Where metrics.jsonl and final/ (Hugging Face weights) go; nothing is written if unset.")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.max_steps < 1 or args.per_device_batch_size < 1 or args.eval_steps < 1:
        parser.error("--max_steps, --per_device_batch_size and --eval_steps must be positive integers")
    return args


def load_model(name: str, ds_config: dict):
    """A tiny built-in model, or ``from_pretrained`` partitioned at load time under ZeRO-3."""
    if name in TINY_MODELS:
        return tiny_model(name.removeprefix("tiny-"))
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(deepspeed_section(ds_config)) if zero_stage(ds_config) == 3 else None
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa")
    del keep_alive  # only needed while the weights load
    return model


def train(args: argparse.Namespace) -> None:
    config_source = args.deepspeed_config or DEMO_CONFIG
    ds_config = load_ds_config(config_source)
    parse_config(ds_config, repr(args.deepspeed_config or "the built-in demo config"))  # fail before loading a model
    init_distributed()
    world_size, rank = get_world_size_and_rank()
    model = load_model(args.model_name_or_path, ds_config)
    vocab = model.config.vocab_size
    engine = subzero_ds.initialize(model=model, config=config_source)

    global_batch = args.per_device_batch_size * world_size
    train_set = pattern_batch(32 * global_batch, args.seq_len, vocab, seed=0)
    eval_batch = rank_slice(pattern_batch(8 * world_size, args.seq_len, vocab, seed=1), rank, world_size)
    metrics = _open_metrics(args.output_dir) if rank == 0 else None
    first_eval = engine.evaluate(eval_batch)
    log(f"{world_size} rank(s), global batch {global_batch}: eval loss before training {first_eval:.4f}")
    started = time.perf_counter()
    for step in range(args.max_steps):
        offset = (step * global_batch) % len(train_set["input_ids"])
        window = {k: v[offset : offset + global_batch] for k, v in train_set.items()}
        result = engine.step(rank_slice(window, rank, world_size))
        if (step + 1) % args.eval_steps == 0 or step + 1 == args.max_steps:
            eval_loss = engine.evaluate(eval_batch)
            seconds = (time.perf_counter() - started) / (step + 1)
            log(f"step {step + 1:5d} | train loss {result.loss:.4f} | eval loss {eval_loss:.4f} | {seconds:.3f} s/step")
            if metrics is not None:
                row = {"step": step + 1, "loss": result.loss, "loss_pos": result.loss_pos, "loss_neg": result.loss_neg,
                       "projected_grad": result.projected_grad, "lr": result.lr, "eval_loss": eval_loss,
                       "seconds_per_step": seconds}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
    log(f"eval loss {first_eval:.4f} -> {eval_loss:.4f} after {args.max_steps} ZO steps")
    if args.output_dir is not None:
        engine.save_pretrained(args.output_dir / "final")
        log(f"saved {args.output_dir / 'final'}")


def _open_metrics(output_dir: Path | None):
    if output_dir is None:
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    return open(output_dir / "metrics.jsonl", "w")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        train(args)
    except (ConfigError, FileNotFoundError, OSError) as e:
        print(f"subzero-train: error: {e}", file=sys.stderr)
        exit_process(2)
    exit_process(0)


if __name__ == "__main__":
    main()
