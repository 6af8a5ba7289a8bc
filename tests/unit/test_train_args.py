"""subzero_ds.train's arguments (args.py, flags.py)."""

import typing
from dataclasses import fields

import pytest

import subzero_ds
from subzero_ds.train import OPTIMIZER_TYPES, Args, DataArgs, TrainArgs, UsageError, parse_args
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

