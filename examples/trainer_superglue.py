"""Zeroth-order fine-tuning with the Hugging Face Trainer: swap `Trainer` for `ZOTrainer`, add a
"subzero" section to the DeepSpeed JSON. Offline, on SmolLM2-135M and a SuperGLUE task from ../shared/data:

    deepspeed --num_gpus 2 examples/trainer_superglue.py --task rte --data_dir ../shared/data/superglue/RTE
    torchrun --nproc_per_node 2 examples/trainer_superglue.py ...           # or accelerate launch, or python
"""

import argparse
import os

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, TrainingArguments

from subzero_ds.tasks.encoding import SampleEncoder
from subzero_ds.integrations import ZOTrainer
from subzero_ds.train.pretrained import SMOLLM2, materialize_smollm2
from subzero_ds.tasks import get_task, load_samples

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=SMOLLM2)
parser.add_argument("--task", default="rte")
parser.add_argument("--data_dir", default="../shared/data/superglue/RTE")
parser.add_argument("--deepspeed", default="ds_configs/zero3_subzero.json")
parser.add_argument("--output_dir", default="outputs/trainer_superglue")
parser.add_argument("--max_steps", type=int, default=100)
parser.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
cli = parser.parse_args()

# TrainingArguments first: under ZeRO-3 it makes from_pretrained partition the weights as they load.
# Under `accelerate launch`, the DeepSpeed config comes from accelerate's config file instead.
accelerate_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
args = TrainingArguments(output_dir=cli.output_dir, deepspeed=None if accelerate_deepspeed else cli.deepspeed,
                         max_steps=cli.max_steps,
                         per_device_train_batch_size=8, per_device_eval_batch_size=8, logging_steps=10,
                         eval_strategy="steps", eval_steps=50, save_steps=50, lr_scheduler_type="constant",
                         report_to=["tensorboard"], use_cpu=not torch.cuda.is_available())
path = materialize_smollm2() if cli.model == SMOLLM2 else cli.model
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")

task, encoder = get_task(cli.task), SampleEncoder(tokenizer, max_length=256)


def examples(split: str, limit: int) -> Dataset:
    """Prompt + answer tokens; the loss (labels) covers the answer only."""
    rows = []
    for sample in load_samples(task, split, data_dir=cli.data_dir, limit=limit, seed=0):
        ids, start = encoder.pair(sample.prompt, sample.target)
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * start + ids[start:]})
    return Dataset.from_list(rows)


def answer_token_accuracy(prediction) -> dict[str, float]:
    """How often the model's next-token argmax is the answer token (labels shifted by one)."""
    predicted, labels = prediction.predictions.argmax(-1)[:, :-1], prediction.label_ids[:, 1:]
    scored = labels != -100
    return {"answer_accuracy": float((predicted[scored] == labels[scored]).mean())}


tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
trainer = ZOTrainer(model=model, args=args, train_dataset=examples("train", 1000), eval_dataset=examples("validation", 200),
                    data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), processing_class=tokenizer,
                    compute_metrics=answer_token_accuracy)
trainer.train()
print(trainer.evaluate())
trainer.save_model(f"{cli.output_dir}/final")  # AutoModelForCausalLM.from_pretrained loads it
