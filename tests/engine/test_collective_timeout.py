"""The collective timeout: its setting (config key, CLI flag) and the message a timed-out collective becomes."""

import pytest

from subzero_ds.config import ConfigError, parse_config
from subzero_ds.faults import Activity, CollectiveTimeoutError, is_collective_timeout, stop_on_collective_timeout
from subzero_ds.phases import phase
from subzero_ds.train.args import UsageError, parse_args

GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                "20000ms for recv operation to complete")


def test_the_timeout_is_a_subzero_key_with_a_default_and_a_cli_flag():
    assert parse_config({"subzero": {}}, "cfg").collective_timeout == 600
    assert parse_config({"subzero": {"collective_timeout": 20}}, "cfg").collective_timeout == 20
    for bad in (0, -5, "20"):
        with pytest.raises(ConfigError, match="`subzero.collective_timeout`"):
            parse_config({"subzero": {"collective_timeout": bad}}, "cfg")
    assert parse_args(["--collective_timeout", "20"]).train.collective_timeout == 20
    assert parse_args([]).train.collective_timeout is None  # then the config's
    with pytest.raises(UsageError, match="--collective_timeout must be a finite number of seconds > 0, got 0"):
        parse_args(["--collective_timeout", "0"])


def test_timeouts_are_told_apart_from_other_runtime_errors():
    assert is_collective_timeout(RuntimeError(GLOO_TIMEOUT))
    assert is_collective_timeout(RuntimeError("Watchdog caught collective operation timeout: WorkNCCL(...)"))
    try:
        try:
            raise RuntimeError(GLOO_TIMEOUT)
        except RuntimeError as cause:
            raise ValueError("wrapped") from cause
    except ValueError as wrapped:
        assert is_collective_timeout(wrapped)
    assert not is_collective_timeout(RuntimeError("Connection closed by peer"))
    assert not is_collective_timeout(ValueError("timed out"))  # not a collective's error type


def test_a_timed_out_collective_becomes_one_message_with_the_step_phase_checkpoint_and_resume(tmp_path):
    activity = Activity("step 13")
    with pytest.raises(CollectiveTimeoutError) as error:
        with stop_on_collective_timeout(activity, 20, lambda: tmp_path / "checkpoint-12", "run it with --resume"):
            with phase("all-reduce"):
                raise RuntimeError(GLOO_TIMEOUT)
    message = str(error.value)
    assert message.startswith("rank 0 of 1 waited 20 s for the other ranks during step 13 (the all-reduce of the "
                              "step's losses), and they did not answer (Timed out waiting 20000ms for recv operation")
    assert f"The last good checkpoint is {tmp_path / 'checkpoint-12'}: run it with --resume" in message
    assert "collective_timeout" in message and "unbound_buffer.cc" not in message

    with pytest.raises(CollectiveTimeoutError, match="No checkpoint was written yet"):
        with stop_on_collective_timeout(Activity(), 20, lambda: None, "run it with --resume"):
            raise RuntimeError(GLOO_TIMEOUT)
    with pytest.raises(RuntimeError, match="^something else$"):  # any other error passes through untouched
        with stop_on_collective_timeout(activity, 20, lambda: None, "run it with --resume"):
            raise RuntimeError("something else")


def test_zotrainer_gives_the_process_group_the_configured_timeout(tmp_path):
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import TrainingArguments

    from helpers.tiny import pattern_batch, tiny_model
    from subzero_ds.distributed import init_distributed, set_collective_timeout
    from subzero_ds.integrations import ZOTrainer

    init_distributed()  # as a script or accelerate may have: the group exists before the trainer
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "zero_optimization": {"stage": 3}, "subzero": {"lr": 1e-3, "rank": 4, "collective_timeout": 77}}
    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=config, max_steps=1, report_to=[], use_cpu=True)
    data = Dataset.from_dict({k: v.tolist() for k, v in pattern_batch(4).items()})
    gloo = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    before = gloo.options._timeout
    try:
        ZOTrainer(model=tiny_model("llama"), args=args, train_dataset=data)
        assert gloo.options._timeout.total_seconds() == 77
    finally:
        set_collective_timeout(before.total_seconds())  # the session's other tests share this group
