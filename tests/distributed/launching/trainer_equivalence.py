"""ZOTrainer against our engine driven by hand on the same batches (launched on 1 or 2 ranks).

Trains a tiny LLaMA with ZOTrainer (recording each rank's micro-batches), then builds a fresh
engine from the same config and steps it by hand over the recorded batches; rank 0 saves both
final weights and the Trainer's log history.
"""

import argparse

import torch
from datasets import Dataset
from transformers import TrainingArguments

import subzero_ds
from helpers.tiny import pattern_batch, tiny_model
from subzero_ds.distributed import exit_process, get_world_size_and_rank
from subzero_ds.checkpoint.export import iter_full_state
from subzero_ds.integrations import ZOTrainer


class RecordingTrainer(ZOTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.recorded.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--local_rank", type=int, default=-1)
    cli = parser.parse_args()
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "subzero": {"lr": 1e-3, "eps": 1e-3, "rank": 4, "seed": 3}}
    args = TrainingArguments(output_dir=f"{cli.workdir}/out", deepspeed=config, max_steps=6, per_device_train_batch_size=2,
                             gradient_accumulation_steps=cli.accumulation, logging_steps=2, report_to=[],
                             lr_scheduler_type="constant", save_strategy="no", use_cpu=True)
    data = pattern_batch(64, seed=0)
    trainer = RecordingTrainer(model=tiny_model("llama"), args=args,
                               train_dataset=Dataset.from_dict({k: v.tolist() for k, v in data.items()}))
    trainer.recorded = []
    trainer.train()
    by_trainer = dict(iter_full_state(trainer.zo_engine.module))

    settings = {**config, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": cli.accumulation}
    engine = subzero_ds.initialize(model=tiny_model("llama"), config=settings)
    for batch in trainer.recorded:
        engine.step(batch)
    by_hand = dict(iter_full_state(engine.module))
    world_size, rank = get_world_size_and_rank()
    if rank == 0:
        torch.save({"trainer": by_trainer, "hand": by_hand, "log_history": trainer.state.log_history,
                    "world_size": world_size, "micro_batches": len(trainer.recorded)}, cli.out)
    exit_process(0)


if __name__ == "__main__":
    main()
