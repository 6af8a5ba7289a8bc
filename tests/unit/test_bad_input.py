"""Bad input, generated: every wrong config, argument or data file gets one clear error, exit code 2.

The properties: the message names the key, flag or path (and row) and says what to do; nothing
is raised but the project's user errors (no traceback from DeepSpeed or torch); and a run that
fails on bad input leaves no --output_dir behind. Most cases run `main(argv)` in-process, where
validation stops them before any process group or model exists; a few go through a real process.
"""

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from subzero_ds.config import ConfigError, check_deepspeed_accepts, load_ds_config, parse_config
from subzero_ds.config.subzero import CoreSettings
from subzero_ds.methods import registry
from subzero_ds.tasks.encoding import SampleEncoder, check_examples
from subzero_ds.tasks import DataError, Sample, find_local_file, get_task, load_samples
from subzero_ds.train import main

REPO = Path(__file__).resolve().parents[2]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))

# JSON values of every kind, for keys that want one particular kind.
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# key -> (is the value acceptable?) for every setting of the "subzero" section.
ACCEPTS = {
    "reshape": lambda v: v in ("auto", "always", "never"),
    "update_rounding": lambda v: v in ("nearest", "stochastic"),
    "lr": lambda v: is_number(v) and math.isfinite(v) and v >= 0,
    "eps": lambda v: is_number(v) and math.isfinite(v) and v > 0,
    "weight_decay": lambda v: is_number(v) and math.isfinite(v) and v >= 0,
    "rank": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "subspace_interval": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "max_consecutive_skips": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "seed": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63,
    "fused": lambda v: isinstance(v, bool),
    "method": lambda v: isinstance(v, str) and v in registry.method_names(),
    "update": lambda v: isinstance(v, str) and v in registry.update_names(),
    "queries": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "momentum": lambda v: is_number(v) and math.isfinite(v) and 0 <= v < 1,
    "betas": lambda v: isinstance(v, list) and len(v) == 2 and all(is_number(b) and math.isfinite(b) and 0 <= b < 1
                                                                    for b in v),
    "adam_eps": lambda v: is_number(v) and math.isfinite(v) and v > 0,
    "state_on_refresh": lambda v: v in ("reset", "project"),
    "hessian_smooth": lambda v: is_number(v) and math.isfinite(v) and 0 <= v <= 1,
    "sparsity": lambda v: is_number(v) and math.isfinite(v) and 0 < v < 1,
    "mask_interval": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
}


# key -> ("method" | "update", its name) for the keys a method or an update rule owns; the rest are core keys.
OWNERS = {key: (kind, name) for kind, names, spec in (("method", registry.method_names(), registry.method),
                                                      ("update", registry.update_names(), registry.update))
          for name in names for key in spec(name).options.model_fields}


def foreign(section: dict, key: str) -> bool:
    """Whether ``key`` belongs to a method or update rule other than the section's."""
    if key not in OWNERS:
        return False
    kind, name = OWNERS[key]
    return section.get(kind, "subzero" if kind == "method" else "sgd") != name


def conflicts(section: dict) -> bool:
    """Whether valid settings still cannot combine (the registered methods' declarations, restated as rules)."""
    spec = registry.method(section.get("method", "subzero"))
    update = section.get("update", "sgd")
    if update not in spec.updates or (section.get("queries", 1) != 1 and not spec.multi_query) or (
            section.get("fused", False) and not spec.fusable):
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


# The command line, in-process ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "train.tsv").write_text("sentence\tlabel\na fine film\t1\na dull film\t0\n")
    (root / "dev.tsv").write_text("sentence\tlabel\ngreat\t1\nbad\t0\n")
    (root / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
                                              "subzero": {"lr": 1e-5}}))
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps({"model_type": "opt", "max_position_embeddings": 64}))
    return root


def base_argv(files, output):
    return ["--train_file", str(files / "train.tsv"), "--validation_file", str(files / "dev.tsv"),
            "--deepspeed_config", str(files / "ds.json"), "--model_name_or_path", str(files / "model"),
            "--output_dir", str(output), "--max_steps", "3", "--max_length", "48"]


def run_main(argv):
    """main(argv) in-process: (exit code, stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, stderr.getvalue()


def assert_rejected(files, argv, *fragments):
    output = Path(argv[argv.index("--output_dir") + 1])
    code, stderr = run_main(argv)
    assert code == 2, stderr
    assert stderr.startswith("subzero-train: error: ") and "Traceback" not in stderr
    prose = [line for line in stderr.splitlines() if not line.startswith("  - ")]
    assert len(prose) <= 4, stderr  # one paragraph, or a short heading over a list of problems
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)
    assert not output.exists(), "a run rejected for bad input must not create --output_dir"


def with_flag(argv, flag, value):
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


def test_the_base_arguments_pass_validation(files, tmp_path):
    from subzero_ds.train import parse_args

    parse_args(base_argv(files, tmp_path / "out")).validate()  # so every rejection below is the flag's


INT_FLAGS = {"--max_steps": 1, "--per_device_batch_size": 1, "--eval_batch_size": 1, "--log_steps": 1,
             "--max_length": 1, "--max_new_tokens": 1, "--lora_r": 1, "--lora_alpha": 1, "--num_virtual_tokens": 1,
             "--num_train": 0, "--num_dev": 0, "--num_eval": 0, "--eval_steps": 0, "--save_steps": 0, "--seed": 0}


@SLOW
@given(flag=st.sampled_from(sorted(INT_FLAGS)), offset=st.integers(min_value=1, max_value=10**6))
def test_an_out_of_range_number_is_named_with_its_lower_bound(files, tmp_path_factory, flag, offset):
    value = INT_FLAGS[flag] - offset
    argv = with_flag(base_argv(files, tmp_path_factory.mktemp("run") / "out"), flag, str(value))
    assert_rejected(files, argv, f"{flag} must be an integer >= {INT_FLAGS[flag]}", str(value))


@SLOW
@given(flag=st.sampled_from(sorted(INT_FLAGS)),
       value=st.text(min_size=1, max_size=8).filter(lambda t: not t.strip().lstrip("+-").isdigit() and
                                                     not t.startswith("-")))
def test_a_number_flag_given_text_names_the_flag(files, tmp_path_factory, flag, value):
    argv = with_flag(base_argv(files, tmp_path_factory.mktemp("run") / "out"), flag, value)
    assert_rejected(files, argv, f"argument {flag}", "invalid int value", "--help")


@SLOW
@given(name=st.from_regex(r"[a-z0-9_]{1,12}", fullmatch=True).filter(
    lambda n: n not in ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad", "drop",
                        "custom")))
def test_an_unknown_task_lists_the_known_ones(files, tmp_path_factory, name):
    argv = with_flag(base_argv(files, tmp_path_factory.mktemp("run") / "out"), "--task", name)
    assert_rejected(files, argv, f"unknown task {name!r}", "sst2, rte")


@SLOW
@given(flag=st.sampled_from(["--train_file", "--validation_file", "--test_file", "--data_dir", "--deepspeed_config",
                             "--model_name_or_path", "--tokenizer"]),
       name=st.from_regex(r"[a-z]{1,10}(\.(tsv|jsonl|json))?", fullmatch=True))
def test_a_missing_path_is_named(files, tmp_path_factory, flag, name):
    missing = tmp_path_factory.mktemp("nothing") / "absent" / name
    argv = base_argv(files, tmp_path_factory.mktemp("run") / "out")
    if flag == "--data_dir":  # the directory replaces the explicit files
        for explicit in ("--train_file", "--validation_file"):
            del argv[argv.index(explicit):argv.index(explicit) + 2]
    assert_rejected(files, with_flag(argv, flag, str(missing)), str(missing))


@SLOW
@given(st.sampled_from(["empty", "dir", "wrong_type", "no_file_for_split"]))
def test_unusable_data_paths_say_what_to_pass(files, tmp_path_factory, case):
    root = tmp_path_factory.mktemp("data")
    argv = base_argv(files, root / "out")
    if case == "dir":
        argv, fragment = with_flag(argv, "--train_file", str(root)), "is a directory"
    elif case == "wrong_type":
        (root / "train.txt").write_text("x")
        argv, fragment = with_flag(argv, "--train_file", str(root / "train.txt")), "unsupported file type '.txt'"
    else:
        (root / "notes.md").write_text("x")
        del argv[argv.index("--train_file"):argv.index("--train_file") + 2]
        argv, fragment = with_flag(argv, "--data_dir", str(root)), "Rename the file, or pass it as --train_file"
        if case == "empty":
            (root / "notes.md").unlink()
            fragment = "an empty directory"
    assert_rejected(files, argv, fragment)


@SLOW
@given(section=st.dictionaries(st.sampled_from(sorted(ACCEPTS)), json_values, min_size=1)
       .filter(lambda s: any(not ACCEPTS[k](v) for k, v in s.items())),
       unknown=st.from_regex(r"[a-z]{3,8}", fullmatch=True))
def test_a_bad_config_file_is_rejected_listing_every_problem(files, tmp_path_factory, section, unknown):
    assume(unknown not in ACCEPTS)
    root = tmp_path_factory.mktemp("cfg")
    config = root / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, unknown: 1}, "subzero": section}))
    argv = with_flag(base_argv(files, root / "out"), "--deepspeed_config", str(config))
    bad = [k for k, v in section.items() if foreign(section, k) or not ACCEPTS[k](v)]
    assert_rejected(files, argv, str(config), *(f"`subzero.{k}`" for k in bad), f"`zero_optimization.{unknown}`")


@SLOW
@given(st.text(max_size=40))
def test_a_malformed_config_file_names_the_path(files, tmp_path_factory, text):
    try:
        assume(not isinstance(json.loads(text), dict))
    except ValueError:
        pass
    root = tmp_path_factory.mktemp("cfg")
    (root / "ds.json").write_text(text)
    argv = with_flag(base_argv(files, root / "out"), "--deepspeed_config", str(root / "ds.json"))
    assert_rejected(files, argv, str(root / "ds.json"))


def test_model_output_and_argument_mistakes_say_what_to_pass(files, tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "no_config").mkdir()
    argv = base_argv(files, tmp_path / "out")
    cases = [
        (with_flag(argv, "--model_name_or_path", str(tmp_path / "a_file")), "is a file"),
        (with_flag(argv, "--model_name_or_path", str(tmp_path / "no_config")), "has no config.json"),
        (with_flag(argv, "--max_length", "100"), "--max_length 100 is longer than the 64 positions"),
        (with_flag(argv, "--output_dir", str(tmp_path / "a_file" / "out")), "a_file is a file"),
        (with_flag(argv, "--label_words", "bad"), "--label_words is for --task custom only"),
        (with_flag(with_flag(argv, "--task", "custom"), "--label_words", "same"), "two or more distinct"),
        (argv + ["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
    ]
    for case, fragment in cases:
        assert_rejected(files, case, fragment)
    code, stderr = run_main(with_flag(argv, "--output_dir", str(tmp_path / "a_file")))
    assert code == 2 and "--output_dir" in stderr and "is a file" in stderr


# Data files --------------------------------------------------------------------------------------

SST2 = get_task("sst2")
RTE = get_task("rte")
CUSTOM = get_task("custom", label_words=["bad", "good"])
VALID_ROWS = [
    (SST2, {"sentence": "a fine film", "label": 1}),
    (RTE, {"premise": "It rains.", "hypothesis": "It is wet.", "label": "entailment"}),
    (CUSTOM, {"text": "a fine film", "label": "good"}),
]
words = st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=12)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@FAST
@given(st.sampled_from(VALID_ROWS), st.data(), st.integers(min_value=0, max_value=5))
def test_a_missing_field_names_file_row_and_field(tmp_path_factory, task_row, data, good_rows):
    task, row = task_row
    missing = data.draw(st.sampled_from(sorted(row)))
    bad = {k: v for k, v in row.items() if k != missing}
    path = write_jsonl(tmp_path_factory.mktemp("d") / "train.jsonl", [row] * good_rows + [bad])
    with pytest.raises(DataError) as caught:
        load_samples(task, "train", file=path)
    message = str(caught.value)
    assert f"{path}, row {good_rows + 1}" in message and f"`{missing}`" in message


LABEL_NAMES = {SST2: ("negative", "positive"), RTE: ("entailment", "not_entailment"), CUSTOM: ("bad", "good")}


def expected_label(value, names):
    """The label index a row's ``value`` means (an index, its digits, a name in any case, a bool for
    false/true labels), or None: written from the data docs, not from the loader."""
    if isinstance(value, bool):
        return int(value) if [n.lower() for n in names] == ["false", "true"] else None
    if isinstance(value, (int, float)):
        return int(value) if value == value and float(value).is_integer() and 0 <= value < len(names) else None
    if isinstance(value, str):
        if value.strip().isascii() and value.strip().isdigit() and int(value.strip()) < len(names):
            return int(value.strip())
        lowered = [n.lower() for n in names]
        return lowered.index(value.strip().lower()) if value.strip().lower() in lowered else None
    return None


@FAST
@given(st.sampled_from(VALID_ROWS), json_values | st.sampled_from(["Positive", " good ", "2", "1", 1.0, 2, -1, "maybe"]))
def test_a_bad_label_names_the_value_and_the_allowed_ones(tmp_path_factory, task_row, label):
    task, row = task_row
    names = LABEL_NAMES[task]
    stored = json.loads(json.dumps(label))  # what the loader reads back from the file
    path = write_jsonl(tmp_path_factory.mktemp("d") / "t.jsonl", [{**row, "label": label}])
    gold = expected_label(stored, names)
    if gold is not None:  # a valid label in some spelling (1, "1", "good", 1.0 ...): loaded as that index
        assert [s.gold for s in load_samples(task, "train", file=path)] == [gold]
        return
    with pytest.raises(DataError) as caught:
        load_samples(task, "train", file=path)
    message = str(caught.value)
    assert f"{path}, row 1" in message and "`label`" in message
    if stored is None:  # null is an absent value
        assert "missing field `label`" in message
    else:
        assert repr(stored) in message and "expected one of 0, 1, " + ", ".join(map(repr, names)) in message


@FAST
@given(st.sampled_from(["train.jsonl", "train.json", "train.tsv", "train.csv"]), st.sampled_from(["", "\n", "  \n\n "]))
def test_an_empty_file_is_rejected(tmp_path_factory, name, content):
    path = tmp_path_factory.mktemp("d") / name
    path.write_text(content if not name.endswith(("tsv", "csv")) else content.strip())
    with pytest.raises(DataError, match="has no rows") as caught:
        load_samples(SST2, "train", file=path)
    assert str(path) in str(caught.value)


@FAST
@given(st.integers(min_value=0, max_value=6), st.sampled_from(['{"sentence": "x", "label": 1', "{sentence: 1}", "nan]",
                                                               '"unterminated', "{} {}", "label\t1"]))
def test_a_malformed_jsonl_line_is_named_by_number(tmp_path_factory, before, broken):
    good = json.dumps({"sentence": "a fine film", "label": 1})
    path = tmp_path_factory.mktemp("d") / "train.jsonl"
    path.write_text("\n".join([good] * before + [broken, good]) + "\n")
    with pytest.raises(DataError) as caught:
        load_samples(SST2, "train", file=path)
    assert f"{path}, line {before + 1}" in str(caught.value) and "not valid JSON" in str(caught.value)


@SLOW
@given(st.sampled_from(["sst2", "rte", "copa", "record", "squad", "drop", "multirc", "wsc"]),
       st.binary(max_size=60) | json_values.map(lambda v: json.dumps(v).encode()),
       st.sampled_from(["jsonl", "json", "tsv", "csv", "parquet"]))
def test_any_file_gives_samples_or_a_data_error_naming_it(tmp_path_factory, task, content, extension):
    path = tmp_path_factory.mktemp("d") / f"train.{extension}"
    path.write_bytes(content)
    try:
        samples = load_samples(get_task(task), "train", file=path)
    except DataError as error:
        assert str(path) in str(error)
    else:
        assert samples and all(isinstance(s, Sample) for s in samples)


def test_a_cell_longer_than_csvs_default_limit_is_read(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\n" + "word " * 40000 + "\t1\n")
    assert len(load_samples(SST2, "train", file=path)[0].prompt) > 200000


def test_find_local_file_checks_paths_without_reading(tmp_path):
    with pytest.raises(DataError, match="no train file for task sst2"):
        find_local_file(SST2, "train", data_dir=tmp_path)
    with pytest.raises(DataError, match="has no hub dataset"):
        find_local_file(CUSTOM, "validation")
    assert find_local_file(SST2, "validation") is None  # the hub
    (tmp_path / "dev.tsv").write_text("not read")
    assert find_local_file(SST2, "validation", data_dir=tmp_path) == tmp_path / "dev.tsv"


# Over-long examples --------------------------------------------------------------------------------


class WordTokenizer:
    """One token per word, ids from a growing vocabulary; BOS 1 first, as in LLaMA's tokenizer."""

    bos_token_id, eos_token_id, pad_token_id, mask_token_id, mask_token = 1, 2, 0, 3, " <mask>"

    def __init__(self):
        self.vocabulary = {"<mask>": 3}

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocabulary.setdefault(w, len(self.vocabulary) + 4) for w in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def sample_of(prompt_words, answer_words):
    return Sample(" ".join(f"p{i}" for i in range(prompt_words)), (" " + " ".join(["a"] * answer_words), " b"), 0)


@FAST
@given(st.lists(st.tuples(st.integers(1, 60), st.integers(1, 4)), min_size=1, max_size=8), st.integers(8, 40))
def test_over_long_examples_are_truncated_with_one_warning_or_rejected(caplog, lengths, max_length):
    samples = [sample_of(p, a) for p, a in lengths]
    over = sum(1 + p + a > max_length for p, a in lengths)
    caplog.clear()
    encoder = SampleEncoder(WordTokenizer(), max_length)
    assert check_examples(samples, encoder, "training") == over
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == (1 if over else 0)
    if over:
        assert f"{over} of {len(samples)} training examples" in warnings[0].getMessage()
        assert "--no_truncation" in warnings[0].getMessage()
    for sample in samples:  # and every batch then fits, with the whole answer and the start token kept
        for candidate in sample.candidates:
            ids, start = encoder.pair(sample.prompt, candidate)
            assert len(ids) <= max_length and ids[0] == 1 and len(ids) - start == len(candidate.split())
    strict = SampleEncoder(WordTokenizer(), max_length, truncate=False)
    if over:
        with pytest.raises(DataError, match=rf"training example \d+ of {len(samples)}: .* over --max_length"):
            check_examples(samples, strict, "training")
    else:
        assert check_examples(samples, strict, "training") == 0


def test_an_example_whose_answer_alone_is_too_long_is_rejected_even_when_truncating():
    encoder = SampleEncoder(WordTokenizer(), max_length=6)
    with pytest.raises(DataError, match="evaluation example 1 of 1: .* cannot be cut to --max_length 6"):
        check_examples([sample_of(3, 6)], encoder, "evaluation")


def test_generation_evaluation_is_prompted_without_the_answer():
    sample = Sample("p q r", (), None, answers=("a b c d e f g",))
    encoder = SampleEncoder(WordTokenizer(), max_length=5)
    assert check_examples([sample], encoder, "evaluation", generate=True) == 0
    with pytest.raises(DataError, match="cannot be cut"):
        check_examples([sample], encoder, "training")


def test_a_masked_lm_keeps_its_mask_when_truncated():
    encoder = SampleEncoder(WordTokenizer(), max_length=4, masked_lm=True)
    ids, _ = encoder.pair("p0 p1 p2 p3 p4", "")
    assert ids == [1, *ids[1:-1], 3] and len(ids) == 4


# Real processes: a few cases end to end ----------------------------------------------------------


def run_cli(*args, launcher=None):
    """``python -m subzero_ds.train ARGS`` (or under ``launcher``) with no rendezvous variables inherited."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "LOCAL_SIZE")}
    command = [*launcher, "--module", "subzero_ds.train"] if launcher else [sys.executable, "-m", "subzero_ds.train"]
    return subprocess.run([*command, *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**env, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from helpers.tiny import save_tiny_pretrained

    path = tmp_path_factory.mktemp("tiny") / "llama"
    save_tiny_pretrained(path, "llama", ["a great film", "a bad film", "It was great terrible"] * 5)
    return path


def test_cli_process_rejects_a_bad_config_without_a_traceback(files, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "disk"}},
                                  "subzero": {"eps": 0, "rnak": 8}}))
    finished = run_cli(*with_flag(base_argv(files, tmp_path / "out"), "--deepspeed_config", str(config)))
    assert finished.returncode == 2 and "Traceback" not in finished.stderr, finished.stderr[-2000:]
    for fragment in ["`subzero.eps`", "`subzero.rnak`", "`zero_optimization.offload_param.device`", "'disk'"]:
        assert fragment in finished.stderr, fragment
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rows,extra,fragments", [
    ("sentence\tlabel\ngood film\t1\nbad film\tmaybe\n", (), ["row 2 (line 3)", "'maybe'", "`label`"]),
    ("sentence\tlabel\n" + "great film " * 60 + "\t1\nbad\t0\n", ("--max_length", "24", "--no_truncation"),
     ["over --max_length 24", "training example"]),
])
def test_cli_process_rejects_bad_data_before_the_model_loads_and_writes_nothing(files, tiny_model, tmp_path,
                                                                                rows, extra, fragments):
    data = tmp_path / "train.tsv"
    data.write_text(rows)
    argv = with_flag(with_flag(base_argv(files, tmp_path / "out"), "--train_file", str(data)),
                     "--model_name_or_path", str(tiny_model))
    finished = run_cli(*argv, *extra)
    assert finished.returncode == 2 and "Traceback" not in finished.stderr, finished.stderr[-2000:]
    for fragment in fragments:
        assert fragment in finished.stderr, (fragment, finished.stderr[-1500:])
    assert not (tmp_path / "out").exists()


@pytest.mark.distributed
def test_two_launched_ranks_exit_non_zero_with_one_message(files, tmp_path):
    from subzero_ds.distributed import free_port

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"subzero": {"lr": "fast"}}))
    deepspeed = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    finished = run_cli(*with_flag(base_argv(files, tmp_path / "out"), "--deepspeed_config", str(config)),
                       launcher=deepspeed)
    assert finished.returncode != 0 and "Traceback" not in finished.stderr + finished.stdout
    assert finished.stderr.count("`subzero.lr`") == 1, finished.stderr[-2000:]  # rank 0 reports; rank 1 is quiet
    assert not (tmp_path / "out").exists()
