"""ZOTrainer preempted (launched on 2 ranks by test_trainer_preemption.py).

--mode uninterrupted: 8 steps. --mode preempted: rank 1 alone gets SIGTERM during step 3 (the other rank must
stop after the same step anyway). --mode resume: train(resume_from_checkpoint=True). Rank 0 saves the final
weights of a run that ends.
"""

import argparse
import os
import signal

import torch
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments

from helpers.tiny import pattern_batch, tiny_model
from subzero_ds.checkpoint.export import iter_full_state
from subzero_ds.distributed import exit_process, get_world_size_and_rank
from subzero_ds.integrations import ZOTrainer


class SignalRankOne(TrainerCallback):
    """SIGTERM to this process on rank 1 when step 3 begins, as a scheduler's signal that reached one rank first."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 2 and get_world_size_and_rank()[1] == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["uninterrupted", "preempted", "resume"], required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    cli = parser.parse_args()
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "subzero": {"lr": 1e-3, "eps": 1e-3, "rank": 4, "seed": 3}}
    args = TrainingArguments(output_dir=f"{cli.workdir}/out", deepspeed=config, max_steps=8,
                             per_device_train_batch_size=2, logging_steps=1, report_to=[], lr_scheduler_type="constant",
                             save_strategy="steps", save_steps=100, use_cpu=True)
    data = pattern_batch(64, seed=0)
    trainer = ZOTrainer(model=tiny_model("llama"), args=args,
                        train_dataset=Dataset.from_dict({k: v.tolist() for k, v in data.items()}),
                        callbacks=[SignalRankOne()] if cli.mode == "preempted" else None)
    trainer.train(resume_from_checkpoint=True if cli.mode == "resume" else None)  # preempted: exits with code 4
    weights = dict(iter_full_state(trainer.zo_engine.module))
    if get_world_size_and_rank()[1] == 0:
        torch.save(weights, f"{cli.workdir}/weights.pt")
    exit_process(0)


if __name__ == "__main__":
    main()
