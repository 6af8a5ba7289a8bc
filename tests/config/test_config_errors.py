"""Bad config input, generated: every wrong "subzero" setting, DeepSpeed setting or config file gets
one clear error.

The properties: the message names the key or path and says what to do; nothing is raised but the
project's user errors (no traceback from DeepSpeed or torch). The same configs through the command
line: tests/cli/test_cli_errors.py.
"""

from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from helpers.bad_input import ACCEPTS, FAST, OWNERS, foreign, json_values
from subzero_ds.config import ConfigError, check_deepspeed_accepts, load_ds_config, parse_config
from subzero_ds.config.subzero import CoreSettings
from subzero_ds.methods import registry

REPO = Path(__file__).resolve().parents[2]


def conflicts(section: dict) -> bool:
    """Whether valid settings still cannot combine (the registered methods' declarations, restated as rules)."""
    spec = registry.method(section.get("method", "subzero"))
    update = section.get("update", "sgd")
    if update not in spec.updates or (section.get("queries", 1) != 1 and not spec.multi_query) or (
            section.get("fused", False) and not spec.fusable) or (
            section.get("replica_mode") == "perturbation" and not spec.multi_query):
        return True
    return "state_on_refresh" in section and update == "sgd"


def test_the_property_table_covers_every_setting():
    assert set(ACCEPTS) == set(CoreSettings.model_fields) | set(OWNERS)


@st.composite
def bad_setting(draw):
    key = draw(st.sampled_from(sorted(ACCEPTS)))
    value = draw(json_values | st.sampled_from([-1, 0, -0.5, float("inf"), float("nan"), 2**63, True, "1e-5"]))
    assume(not ACCEPTS[key](value))
    return key, value


@FAST
@given(bad_setting())
def test_a_bad_setting_is_named_with_its_value_and_what_it_expects(setting):
    key, value = setting
    owner = {OWNERS[key][0]: OWNERS[key][1]} if key in OWNERS else {}  # in its method's (or update rule's) section
    with pytest.raises(ConfigError) as caught:
        parse_config({"subzero": {**owner, key: value}}, "run.json")
    message = str(caught.value)
    assert "run.json" in message and f"`subzero.{key}`" in message
    assert message.count("\n  - ") == 1
    assert "Expected:" in message or "known settings" in message
    assert len(message) < 1000  # a huge value is cut short, not echoed whole


@FAST
@given(st.dictionaries(st.sampled_from(sorted(ACCEPTS)), json_values, min_size=1))
def test_valid_settings_parse_and_each_bad_one_is_listed_once(section):
    bad = sorted(k for k, v in section.items() if foreign(section, k) or not ACCEPTS[k](v))
    if not bad:
        if conflicts(section):  # named by test_methods.py's combination test
            with pytest.raises(ConfigError):
                parse_config({"subzero": section})
        else:
            parse_config({"subzero": section})
        return
    with pytest.raises(ConfigError) as caught:
        parse_config({"subzero": section})
    message = str(caught.value)
    assert message.count("\n  - ") == len(bad)  # every problem at once, each once
    assert all(f"`subzero.{k}`" in message for k in bad)


@FAST
@given(st.text(min_size=1, max_size=20).filter(lambda k: k not in ACCEPTS), json_values)
def test_an_unknown_setting_is_named_with_the_known_ones(key, value):
    with pytest.raises(ConfigError, match="known settings") as caught:
        parse_config({"subzero": {"lr": 1e-5, key: value}})
    assert f"`subzero.{key}`" in str(caught.value)


@FAST
@given(json_values.filter(lambda v: not isinstance(v, dict)))
def test_a_section_that_is_not_an_object_is_rejected(section):
    with pytest.raises(ConfigError, match="`subzero` must be a JSON object"):
        parse_config({"subzero": section})


@FAST
@given(st.sampled_from(["train_micro_batch_size_per_gpu", "train_batch_size"]),
       json_values | st.integers(max_value=0))
def test_a_batch_size_must_be_a_positive_integer(key, value):
    assume(not (isinstance(value, int) and not isinstance(value, bool) and value >= 1) and value is not None)
    with pytest.raises(ConfigError, match=f"`{key}` must be an integer >= 1"):
        parse_config({key: value, "subzero": {}})


@FAST
@given(json_values)
def test_zero_stage_must_be_0_or_3(stage):
    assume(isinstance(stage, bool) or stage not in (0, 3))
    with pytest.raises(ConfigError, match="`zero_optimization.stage`"):
        parse_config({"zero_optimization": {"stage": stage}, "subzero": {}})


@FAST
@given(st.from_regex(r"[a-z_]{3,20}", fullmatch=True), json_values)
def test_deepspeed_rejects_an_unknown_zero_setting_before_anything_loads(key, value):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    assume(key not in set(fields) | {field.alias for field in fields.values()})
    with pytest.raises(ConfigError) as caught:
        check_deepspeed_accepts({"zero_optimization": {"stage": 3, key: value}}, "ds.json")
    assert "DeepSpeed rejects ds.json" in str(caught.value) and f"`zero_optimization.{key}`" in str(caught.value)


@pytest.mark.parametrize("config,fragment", [
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "disk"}}}, "zero_optimization.offload_param.device"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "cannot be simultaneously enabled"),
    ({"tensorboard": {"enabled": True, "outdir": 3}}, "tensorboard."),
    ({"fp16": {"enabled": True, "loss_scale": -1}}, "fp16.loss_scale"),
])
def test_deepspeed_settings_deepspeed_itself_rejects_are_reported(config, fragment):
    with pytest.raises(ConfigError, match="DeepSpeed rejects") as caught:
        check_deepspeed_accepts(config)
    assert fragment in str(caught.value)


def test_a_half_precision_the_accelerator_lacks_is_reported_before_anything_loads(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    with pytest.raises(ConfigError, match="DeepSpeed rejects ds.json") as caught:
        check_deepspeed_accepts({"fp16": {"enabled": True}}, "ds.json")
    assert "`fp16.enabled`" in str(caught.value) and "does not support fp16" in str(caught.value)
    assert '"bf16": {"enabled": true}' in str(caught.value)
    check_deepspeed_accepts({"fp16": {"enabled": False}}, "ds.json")  # disabled: nothing to report


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_passes_deepspeeds_parser(path):
    check_deepspeed_accepts(load_ds_config(path), str(path))


# Config files ------------------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=80) | st.text(max_size=80).map(str.encode))
def test_any_file_content_loads_as_an_object_or_is_rejected_naming_the_path(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("cfg") / "ds.json"
    path.write_bytes(content)
    try:
        loaded = load_ds_config(path)
    except ConfigError as error:
        assert str(path) in str(error)
    else:
        assert isinstance(loaded, dict)


def test_config_file_problems_name_the_path_and_the_fix(tmp_path):
    cases = {
        "missing.json": (None, "does not exist"),
        "dir.json": ("dir", "is a directory"),
        "binary.json": (b"\xff\xfe{\x00", "not UTF-8"),
        "dup.json": (b'{"subzero": {"lr": 1e-5, "lr": 1e-4}}', "sets 'lr' twice"),
        "list.json": (b"[1, 2]", "must hold a JSON object"),
        "deep.json": (b"[" * 100000, "nested too deeply"),
        "comma.json": (b'{"subzero": {"lr": 1e-5,}}', "not valid JSON"),
    }
    for name, (content, fragment) in cases.items():
        path = tmp_path / name
        if content == "dir":
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
        with pytest.raises(ConfigError) as caught:
            load_ds_config(path)
        assert str(path) in str(caught.value) and fragment in str(caught.value), name
