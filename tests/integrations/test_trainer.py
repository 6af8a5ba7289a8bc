"""ZOTrainer on 1 rank: what Trainer users rely on (callbacks, metrics, TensorBoard, saving, resume, PEFT) and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from subzero_ds.adapters import Tuning, add_adapter
from subzero_ds.config import ConfigError
from helpers.tiny import pattern_batch, tiny_model
from subzero_ds.checkpoint.export import iter_full_state
from subzero_ds.integrations import ZOTrainer

CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "subzero": {"lr": 1e-3, "eps": 1e-3, "rank": 4, "seed": 5}}


def dataset(rows: int = 32, seed: int = 0) -> Dataset:
    return Dataset.from_dict({k: v.tolist() for k, v in pattern_batch(rows, seed=seed).items()})


def arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(tmp_path / "out"), deepspeed=CONFIG, max_steps=6, per_device_train_batch_size=4,
                    per_device_eval_batch_size=4, logging_steps=2, report_to=[], save_strategy="no", use_cpu=True,
                    lr_scheduler_type="constant")
    return TrainingArguments(**{**settings, **overrides})


class Events(TrainerCallback):
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __getattribute__(self, name):
        if name.startswith("on_"):
            counts = object.__getattribute__(self, "counts")
            return lambda *a, **k: counts.__setitem__(name, counts.get(name, 0) + 1)
        return object.__getattribute__(self, name)


def mean_prediction(prediction) -> dict[str, float]:
    return {"mean_logit": float(np.mean(prediction.predictions))}


def test_callbacks_metrics_and_tensorboard(tmp_path):
    events = Events()
    args = arguments(tmp_path, eval_strategy="steps", eval_steps=3, report_to=["tensorboard"])
    trainer = ZOTrainer(model=tiny_model("llama"), args=args, train_dataset=dataset(), eval_dataset=dataset(8, 1),
                        compute_metrics=mean_prediction, callbacks=[events])
    trainer.train()
    assert events.counts["on_step_end"] == 6 and events.counts["on_evaluate"] == 2
    assert events.counts["on_train_begin"] == 1 and events.counts["on_log"] >= 3
    evaluated = [row for row in trainer.state.log_history if "eval_mean_logit" in row]
    assert [row["step"] for row in evaluated] == [3, 6] and all(np.isfinite(r["eval_loss"]) for r in evaluated)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = list((tmp_path / "out").glob("**/events.out.tfevents.*"))
    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    assert {"train/loss", "eval/mean_logit"} <= set(accumulator.Tags()["scalars"])
    assert [e.step for e in accumulator.Scalars("train/loss")] == [2, 4, 6]


def test_save_model_gives_weights_from_pretrained_loads(tmp_path):
    trainer = ZOTrainer(model=tiny_model("llama"), args=arguments(tmp_path), train_dataset=dataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    trained = dict(iter_full_state(trainer.zo_engine.module))
    assert all(torch.equal(loaded[k], v) for k, v in trained.items() if k in loaded)
    initial = tiny_model("llama").state_dict()
    assert max((loaded[k] - initial[k]).abs().max().item() for k in initial) > 1e-4


def test_resume_from_checkpoint_is_bit_exact(tmp_path):
    uninterrupted = ZOTrainer(model=tiny_model("llama"), args=arguments(tmp_path / "a"), train_dataset=dataset())
    uninterrupted.train()
    first = ZOTrainer(model=tiny_model("llama"), args=arguments(tmp_path / "b", save_strategy="steps", save_steps=3),
                      train_dataset=dataset())
    first.train()
    resumed = ZOTrainer(model=tiny_model("llama"), args=arguments(tmp_path / "b"), train_dataset=dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3"))
    assert resumed.state.global_step == 6 and resumed.zo_engine.global_step == 6
    a, b = dict(iter_full_state(uninterrupted.zo_engine.module)), dict(iter_full_state(resumed.zo_engine.module))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "out" / "checkpoint-3" / "zo").is_dir()


def test_a_peft_model_trains_only_its_adapter_and_saves_it(tmp_path):
    from peft import PeftModel

    model = add_adapter(tiny_model("llama"), Tuning.LORA)
    config = {**CONFIG, "subzero": {**CONFIG["subzero"], "lr": 1e-2, "eps": 1e-2}}
    trainer = ZOTrainer(model=model, args=arguments(tmp_path, deepspeed=config), train_dataset=dataset())
    before = dict(iter_full_state(trainer.zo_engine.module))
    trainer.train()
    after = dict(iter_full_state(trainer.zo_engine.module))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")


@pytest.mark.parametrize("change,fragment", [
    (dict(optimizers=(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), None)), "optimizers"),
    (dict(learning_rate=3e-4), "subzero.lr"),
    (dict(deepspeed={**CONFIG, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}), "`optimizer`"),
    (dict(deepspeed={k: v for k, v in CONFIG.items() if k != "subzero"}), '"subzero" section'),
    (dict(deepspeed=None), "deepspeed"),
    (dict(deepspeed={**CONFIG, "subzero": {**CONFIG["subzero"], "replica_mode": "perturbation"}}), "batch_share"),
])
def test_what_makes_no_sense_for_zo_gets_one_clear_error(tmp_path, change, fragment):
    optimizers = change.pop("optimizers", (None, None))
    with pytest.raises(ConfigError, match=fragment):
        ZOTrainer(model=tiny_model("llama"), args=arguments(tmp_path, **change), train_dataset=dataset(),
                  optimizers=optimizers)
