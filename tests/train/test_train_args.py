"""subzero_ds.train's arguments (args.py, flags.py) and its engines behind one protocol (engines.py)."""

import math
import typing
from dataclasses import fields

import pytest
import torch

import subzero_ds
from helpers.configs import zo_section
from helpers.tiny import pattern_batch, tiny_model
from subzero_ds.checkpoint.sharded import CheckpointError
from subzero_ds.train import (OPTIMIZER_TYPES, Args, DataArgs, FirstOrderEngine, TrainArgs, TrainingEngine, UsageError,
                              ZOEngine, first_order_config, parse_args)
from subzero_ds.loss import language_model_loss
from subzero_ds.train.args import Optimizer
from subzero_ds.train.flags import build_parser

GROUPS = [f.name for f in fields(Args)]


def test_every_field_is_a_flag_with_the_fields_default():
    flags = {a.dest: a for a in build_parser(Args)._actions}
    for group in GROUPS:
        for f in fields(getattr(Args(), group)):
            if f.metadata.get("deepspeed"):
                continue  # DeepSpeed's own flag (--deepspeed_config)
            assert f.name in flags and flags[f.name].option_strings == [f"--{f.name}"], f.name
            assert flags[f.name].help == f.metadata["help"]
    assert "deepspeed_config" in flags  # added by deepspeed.add_config_arguments, read into TrainArgs
    assert parse_args([]) == Args()  # the flags' defaults are the fields' defaults


def test_flags_are_typed_from_the_annotations():
    args = parse_args(["--num_train", "5", "--max_train_seconds", "2.5", "--train_file", "a/b.tsv", "--tuning", "lora",
                       "--label_words", "bad", "good", "--task", "custom", "--resume", "--deepspeed_config", "ds.json"])
    assert args.data.num_train == 5 and args.train.max_train_seconds == 2.5
    assert args.data.train_file.parts == ("a", "b.tsv") and args.data.label_words == ["bad", "good"]
    assert args.adapter.tuning is subzero_ds.adapters.Tuning.LORA and args.train.resume == "auto"
    assert args.train.deepspeed_config == "ds.json"


def test_the_optimizer_choices_are_zo_and_the_first_order_types():
    assert typing.get_args(Optimizer) == ("zo", *OPTIMIZER_TYPES)


def test_out_of_range_flags_of_several_groups_are_reported_together():
    with pytest.raises(UsageError) as error:
        parse_args(["--max_steps", "0", "--eval_batch_size", "0", "--num_train", "-1"])
    message = str(error.value)
    for fragment in ("--max_steps must be an integer >= 1, got 0", "--eval_batch_size must be an integer >= 1, got 0",
                     "--num_train must be an integer >= 0, got -1"):
        assert fragment in message, message


def test_a_group_checks_its_flags_when_built():
    with pytest.raises(UsageError, match="--save_steps and --resume checkpoint ZO runs"):
        TrainArgs(optimizer="sgd", save_steps=2)
    with pytest.raises(UsageError, match="--learning_rate must be a finite number > 0, got nan"):
        TrainArgs(optimizer="adamw", learning_rate=float("nan"))
    with pytest.raises(UsageError, match="--label_words is for --task custom only"):
        DataArgs(task="sst2", label_words=["no", "yes"])
    with pytest.raises(UsageError, match="--seed must be below 2\\*\\*63"):
        DataArgs(seed=2**63)


def protocol_members():
    return {name for name in dir(TrainingEngine) if not name.startswith("_")} | set(
        typing.get_type_hints(TrainingEngine))


def test_the_zo_engine_gives_the_loop_what_the_protocol_names(tmp_path):
    config = {"zero_optimization": {"stage": 3}, "subzero": zo_section(lr=1e-3, eps=1e-3, rank=4, seed=7)}
    engine = ZOEngine(subzero_ds.initialize(model=tiny_model("llama"), config=config))
    assert all(hasattr(engine, name) for name in protocol_members())
    assert engine.description == "ZO" and engine.forwards_per_micro_batch == 2 and engine.accumulation_steps == 1
    row = engine.step(pattern_batch(4))
    assert set(row) == {"loss", "loss_pos", "loss_neg", "projected_grad", "lr", "skipped"}
    assert row["projected_grad"] == pytest.approx((row["loss_pos"] - row["loss_neg"]) / 2e-3, rel=1e-6)
    assert row["loss"] == pytest.approx((row["loss_pos"] + row["loss_neg"]) / 2) and engine.global_step == 1
    path = engine.save_checkpoint(tmp_path, extra={"data_seed": 0}, keep_last=1)
    assert engine.load_checkpoint(path) == {"data_seed": 0}


def test_the_first_order_engine_gives_the_loop_what_the_protocol_names(tmp_path):
    ds_config = first_order_config({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}},
                                   "sgd", 1e-2, 0.0)
    engine = FirstOrderEngine(tiny_model("llama"), ds_config, lambda model, batch: model(**batch).loss, "sgd")
    assert all(hasattr(engine, name) for name in protocol_members())
    assert engine.description == "first-order (sgd)" and engine.forwards_per_micro_batch == 1
    before = [p.detach().clone() for p in engine.module.parameters()]
    row = engine.step(pattern_batch(4))
    assert set(row) == {"loss", "lr"} and row["lr"] == 1e-2 and engine.global_step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))  # SGD moved the weights
    with pytest.raises(CheckpointError, match="runs from start to end"):
        engine.save_checkpoint(tmp_path, extra={}, keep_last=1)


def test_the_first_order_baseline_trains_with_the_lm_loss_under_zero3():
    """The LM loss under autograd runs the LM head as itself: scoring inside it (the ZO path, no autograd) would
    leave ZeRO-3's backward hooks without the head's output ('active_backward_submodules is empty')."""
    ds_config = first_order_config({"zero_optimization": {"stage": 3}, "subzero": {}}, "adamw", 1e-3, 0.0)
    engine = FirstOrderEngine(tiny_model("llama"), ds_config, language_model_loss, "adamw")
    before = [p.detach().clone() for p in engine.module.parameters()]
    row = engine.step(pattern_batch(4))
    assert math.isfinite(row["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
