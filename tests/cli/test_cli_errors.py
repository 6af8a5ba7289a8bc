"""Bad input to subzero-train, generated: every wrong argument, config or data file gets one clear
error, exit code 2.

The properties: the message names the key, flag or path (and row) and says what to do; nothing
is raised but the project's user errors (no traceback from DeepSpeed or torch); and a run that
fails on bad input leaves no --output_dir behind. Most cases run `main(argv)` in-process, where
validation stops them before any process group or model exists; a few go through a real process.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from helpers.bad_input import ACCEPTS, SLOW, foreign, json_values
from subzero_ds.train import main

REPO = Path(__file__).resolve().parents[2]


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
