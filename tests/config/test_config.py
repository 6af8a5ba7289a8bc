"""The "subzero" section: defaults, strict validation, all problems reported at once."""

import json
from pathlib import Path

import pytest

from subzero_ds.config import ConfigError, load_ds_config, parse, parse_config
from subzero_ds.config.deepspeed import Precision
from subzero_ds.methods.subzero import Reshape

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def test_defaults_fill_an_empty_section():
    settings = parse_config({"zero_optimization": {"stage": 3}, "subzero": {}})
    assert settings.method == "subzero" and settings.options.reshape is Reshape.AUTO
    assert (settings.eps, settings.options.rank, settings.options.subspace_interval, settings.seed) == (1e-3, 24, 1000, 0)


def test_valid_section_is_parsed():
    settings = parse_config({"subzero": {"method": "subzero", "lr": 1e-5, "eps": 1e-2, "weight_decay": 0.1,
                                         "reshape": "never", "seed": 7, "update": "adam", "betas": [0.8, 0.9]}})
    assert settings.method == "subzero" and settings.options.reshape is Reshape.NEVER
    assert (settings.lr, settings.eps, settings.weight_decay, settings.seed) == (1e-5, 1e-2, 0.1, 7)
    assert settings.update == "adam" and settings.update_options.betas == [0.8, 0.9]


@pytest.mark.parametrize("section,owner", [
    ({"method": "mezo", "rank": 8}, '`subzero.method` "subzero"'),
    ({"method": "subzero", "sparsity": 0.5}, '`subzero.method` "sparse_mezo"'),
    ({"method": "mezo", "hessian_smooth": 1e-3}, '`subzero.method` "hizoo"'),
    ({"update": "sgd", "betas": [0.9, 0.99]}, '`subzero.update` "adam"'),
    ({"update": "adam", "momentum": 0.9}, '`subzero.update` "momentum"'),
])
def test_a_key_of_another_method_or_update_rule_is_refused_by_name(section, owner):
    """`"method": "mezo"` with `"rank"` parsed silently once (and then blocked a resume): now it names the owner."""
    key = next(k for k in section if k not in ("method", "update"))
    with pytest.raises(ConfigError) as caught:
        parse_config({"subzero": section})
    message = str(caught.value)
    assert f"`subzero.{key}`" in message and owner in message and "remove it" in message
    assert message.count("\n  - ") == 1


def test_the_flat_dump_round_trips_and_names_what_defines_the_directions():
    section = {"method": "subzero", "rank": 8, "update": "momentum", "momentum": 0.5, "seed": 3}
    settings = parse_config({"subzero": section})
    assert parse_config({"subzero": settings.flat()}) == settings
    assert settings.direction_settings() == {"method": "subzero", "seed": 3, "queries": 1, "update": "momentum",
                                             "rank": 8, "subspace_interval": 1000, "reshape": "auto"}
    assert "rank" not in parse_config({"subzero": {"method": "mezo"}}).flat()


def test_deepspeed_settings_are_read_once_with_their_aliases_and_defaults():
    _, deepspeed = parse({"subzero": {}, "bfloat16": {"enabled": True}, "gradient_accumulation_steps": 4,
                          "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                                "stage3_param_persistence_threshold": 5e3}})
    assert deepspeed.precision is Precision.BF16 and deepspeed.stage == 3 and deepspeed.offload_device == "cpu"
    assert (deepspeed.accumulation_steps, deepspeed.persistence_threshold, deepspeed.prefetch_bucket_size) == (4, 5000, 50_000_000)
    assert "subzero" not in deepspeed.section
    _, default = parse({"subzero": {}})
    assert (default.precision, default.stage, default.offload_device, default.accumulation_steps) == (Precision.FP32, 0, "none", 1)


def test_every_problem_is_reported_at_once_with_key_value_and_fix():
    bad = {
        "optimizer": {"type": "AdamW"},
        "zero_optimization": {"stage": 2},
        "subzero": {"method": "subzero", "lr": "1e-5", "eps": -1, "rnak": 8, "subspace_interval": 0, "update": "sgdd"},
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(bad, "my.json")
    message = str(caught.value)
    assert "my.json" in message
    for fragment in ["`subzero.update`", "'sgdd'", "`subzero.lr`", "'1e-5'", "`subzero.eps`", "-1",
                     "`subzero.rnak`", "known settings", "`subzero.subspace_interval`",
                     "`optimizer`", "Remove the `optimizer` block", "`zero_optimization.stage` is 2", "Use 3"]:
        assert fragment in message, fragment
    assert message.count("\n  - ") == 7


@pytest.mark.parametrize("section,key", [
    ({"rank": 2.5}, "subzero.rank"), ({"rank": True}, "subzero.rank"), ({"seed": -1}, "subzero.seed"),
    ({"reshape": "maybe"}, "subzero.reshape"), ({"weight_decay": -0.1}, "subzero.weight_decay"),
])
def test_wrong_types_and_ranges_are_rejected(section, key):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        parse_config({"subzero": section})


@pytest.mark.parametrize("extra,fragment", [
    ({"scheduler": {"type": "WarmupLR"}}, "`scheduler`"),
    ({"gradient_accumulation_steps": 0}, "`gradient_accumulation_steps`"),
    ({"gradient_accumulation_steps": "4"}, "`gradient_accumulation_steps`"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
    ({"zero_optimization": {"stage": 0, "offload_param": {"device": "cpu"}}}, "offload_param"),
    ({"subzero": [1, 2]}, "`subzero` must be a JSON object"),
])
def test_deepspeed_settings_we_cannot_serve_are_rejected(extra, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_config({"subzero": {}, **extra})


def test_missing_and_malformed_files_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_ds_config(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"subzero": {"lr": 1e-5,}}')
    with pytest.raises(ConfigError, match=r"broken.json.*not valid JSON.*line 1"):
        load_ds_config(broken)


def test_shipped_configs_exist():
    assert len(SHIPPED_CONFIGS) >= 3


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    ds_config = load_ds_config(path)
    assert "subzero" in ds_config, f"{path.name} has no subzero section"
    parse_config(ds_config, str(path))
    json.loads(path.read_text())


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs" / "first_order").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_first_order_config_builds_a_deepspeed_optimizer(path):
    from subzero_ds.config import check_deepspeed_accepts
    from subzero_ds.train.first_order import first_order_config

    ds_config = load_ds_config(path)
    check_deepspeed_accepts(ds_config, str(path))
    built = first_order_config(ds_config, ds_config["optimizer"]["type"].lower(), 1e-5, 0.0)
    assert built["optimizer"] == ds_config["optimizer"] and "subzero" not in built
