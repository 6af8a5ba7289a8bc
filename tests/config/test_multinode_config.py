"""DeepSpeed's multi-node settings a ZO run cannot serve: MiCS (removed from DeepSpeed), ZeRO++ qwZ and
qgZ, and an hpZ group size that cannot form. Each is refused before any model loads, naming the key,
the value and the fix; hpZ's group size is read into the typed settings. The same configs through
the command line: tests/cli/test_multinode_refusals.py.
"""

import pytest
import torch

import subzero_ds
from subzero_ds.config import ConfigError, check_deepspeed_accepts, parse, parse_config
from subzero_ds.config.deepspeed import deepspeed_accepts, parse_deepspeed
from subzero_ds.config.environment import hpz_problems
from subzero_ds.distributed import launcher_world_size

LAUNCHER_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    """No launcher's world size (as in a plain pytest process)."""
    for variable in LAUNCHER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def zero3(**zero):
    return {"zero_optimization": {"stage": 3, **zero}, "subzero": {"lr": 1e-5}}


def refusals(config) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(config, "ds.json")
    return str(caught.value)


def assert_says(message, *fragments):
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("zero,fragments", [
    ({"mics_shard_size": 8}, ["`zero_optimization.mics_shard_size` (8)", "removed from DeepSpeed in 0.19.7",
                              '"zero_hpz_partition_size": <GPUs per node>']),
    ({"mics_hierarchical_params_gather": True}, ["`zero_optimization.mics_hierarchical_params_gather` (True)",
                                                 "0.19.7", "zero_hpz_partition_size"]),
    ({"zero_quantized_weights": True}, ["`zero_optimization.zero_quantized_weights` is True", "int8",
                                        "8-10% relative error", "Set it to false", '"zero_hpz_partition_size"']),
    ({"zero_quantized_gradients": True}, ["`zero_optimization.zero_quantized_gradients` is True",
                                          "computes no gradients", "Set it to false"]),
    ({"stage": 0, "zero_hpz_partition_size": 8}, ["`zero_optimization.zero_hpz_partition_size` is 8",
                                                  "`zero_optimization.stage` is 0",
                                                  "Set `zero_optimization.stage` to 3"]),
    ({"zero_hpz_partition_size": 8, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}},
     ["`zero_optimization.zero_hpz_partition_size` is 8", '"nvme"', 'Offload to "cpu"',
      "set `zero_hpz_partition_size` to 1"]),
    ({"zero_hpz_partition_size": 0}, ["`zero_optimization.zero_hpz_partition_size`", "got 0", "an integer >= 1",
                                      "the GPUs per node"]),
    ({"zero_hpz_partition_size": "8"}, ["`zero_optimization.zero_hpz_partition_size`", "got '8'", "an integer >= 1"]),
    ({"zero_hpz_partition_size": True}, ["`zero_optimization.zero_hpz_partition_size`", "got True"]),
])
def test_each_refusal_names_the_key_the_value_and_the_fix(zero, fragments):
    message = refusals(zero3(**zero))
    assert message.count("\n  - ") == 1, message
    assert_says(message, "ds.json", *fragments)


def test_all_problems_come_together_and_initialize_refuses_them_before_the_model_is_touched(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # as the deepspeed launcher or torchrun set it
    monkeypatch.setattr("subzero_ds.api.init_distributed", lambda **_: pytest.fail("refused after parse"))
    config = zero3(mics_shard_size=2, mics_hierarchical_params_gather=True, zero_quantized_weights=True,
                   zero_quantized_gradients=True, zero_hpz_partition_size=3)
    with pytest.raises(ConfigError) as caught:
        subzero_ds.initialize(model=torch.nn.Linear(2, 2), config=config)
    message = str(caught.value)
    assert message.count("\n  - ") == 4, message  # MiCS's two keys in one problem
    assert_says(message, "`zero_optimization.mics_shard_size` (2) and "
                "`zero_optimization.mics_hierarchical_params_gather`",
                "`zero_optimization.zero_quantized_weights`", "`zero_optimization.zero_quantized_gradients`",
                "`zero_optimization.zero_hpz_partition_size` is 3 but the world has 4 ranks",
                "must divide the world size", "here e.g. 2 or 4")


@pytest.mark.parametrize("variable", LAUNCHER_VARIABLES)
def test_the_launchers_world_size_is_read_before_the_process_group(monkeypatch, variable):
    assert launcher_world_size() is None
    monkeypatch.setenv(variable, "16")
    assert launcher_world_size() == 16
    _, settings = parse(zero3(zero_hpz_partition_size=8))
    assert settings.hpz_partition_size == 8
    monkeypatch.setenv(variable, "12")
    assert "the world has 12 ranks" in refusals(zero3(zero_hpz_partition_size=8))
    monkeypatch.setenv(variable, "1")  # what init_distributed leaves in a process started without a launcher
    assert parse(zero3(zero_hpz_partition_size=8))[1].hpz_partition_size == 8


@pytest.mark.parametrize("size,world_size,fix", [(3, 4, "here e.g. 2 or 4"), (8, 12, "here e.g. 2, 3, 4 or 6"),
                                                 (4, 17, "here 1 or 17")])
def test_hpz_problems_checks_the_world_size_known_after_init_distributed(size, world_size, fix):
    _, settings = parse(zero3(zero_hpz_partition_size=size))  # no launcher: not checked at parse time
    [problem] = hpz_problems(settings, world_size)
    assert_says(problem, f"`zero_optimization.zero_hpz_partition_size` is {size} but the world has {world_size} ranks",
                "must divide the world size", "the GPUs per node (8 on a DGX)", fix)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8, 16, 64])
def test_a_size_that_divides_the_world_or_spans_it_is_served(world_size):
    # DeepSpeed forms groups of min(K, world size) ranks: K = 8 on one GPU or on a 3-GPU box is one group of all.
    _, settings = parse(zero3(zero_hpz_partition_size=8))
    assert hpz_problems(settings, world_size) == []


def test_what_a_zo_run_can_use_is_accepted_and_read():
    # Frozen weights in int8 are rounded once and are the same in every forward: served.
    _, settings = parse(zero3(zero_hpz_partition_size=8, offload_param={"device": "cpu"},
                              zero_quantized_weights=False, zero_quantized_gradients=False,
                              zero_quantized_nontrainable_weights=True))
    assert (settings.hpz_partition_size, settings.offload_device) == (8, "cpu")
    assert parse(zero3())[1].hpz_partition_size == 1
    assert hpz_problems(parse(zero3())[1], 3) == []
    check_deepspeed_accepts(zero3(zero_hpz_partition_size=8))  # DeepSpeed's own parser takes it too


def test_a_first_order_run_may_quantize_but_not_use_mics_or_an_orphan_hpz():
    settings, problems = parse_deepspeed({"zero_optimization": {"stage": 3, "zero_quantized_weights": True,
                                                                "zero_quantized_gradients": True}}, zeroth_order=False)
    assert settings is not None and problems == []
    _, problems = parse_deepspeed({"zero_optimization": {"stage": 2, "mics_shard_size": 2,
                                                         "zero_hpz_partition_size": 2}}, zeroth_order=False)
    assert len(problems) == 2 and "MiCS" in problems[0] and "`zero_optimization.stage` is 2" in problems[1]


def test_deepspeeds_config_errors_are_reported_not_raised_and_mics_only_once():
    # DeepSpeed 0.19.8 raises DeepSpeedConfigError at the first removed key and stops there: each is reported,
    # and the parser still reads the rest. MiCS's keys are parse_deepspeed's to report (test above), not again here.
    problems = deepspeed_accepts({"zero_optimization": {"stage": 3, "mics_shard_size": 2,
                                                        "stage3_prefetch_bucket_size": -1},
                                  "amp": {"enabled": True}, "nebula": {"enabled": True}})
    assert len(problems) == 3, problems
    assert_says(problems[0], "`nebula` is set, but DeepSpeed has removed it", "Remove `nebula`.")
    assert_says(problems[1], "`amp` is set", "Apex AMP", "Remove `amp`.")
    assert_says(problems[2], "`zero_optimization.stage3_prefetch_bucket_size`", "got -1")
    assert "MiCS" not in "".join(problems)
    with pytest.raises(ConfigError) as caught:
        check_deepspeed_accepts({"data_types": {"keep_in_fp32_modules": 5}}, "ds.json")
    assert_says(str(caught.value), "DeepSpeed rejects ds.json", "`data_types.keep_in_fp32_modules`",
                'must be "auto" or a list of name patterns, got 5')
