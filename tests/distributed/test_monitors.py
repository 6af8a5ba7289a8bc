"""DeepSpeed's TensorBoard and W&B monitors get the CLI's metrics rows under `subzero/<name>` (1 rank).

One CLI run with both monitors enabled in the DeepSpeed JSON (W&B in offline mode); the event
files and the W&B run file are read back and compared with metrics.jsonl, row by row.
"""

import json
import struct

import pytest

from cli_runs import NEGATIVE, POSITIVE, read_metrics, train_command
from helpers.tiny import save_tiny_pretrained
from launch import run

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitors")
    rows = [(t, 1) for t in POSITIVE] + [(t, 0) for t in NEGATIVE]
    for name, copies in [("train.tsv", 4), ("dev.tsv", 1)]:
        (root / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows * copies))
    save_tiny_pretrained(root / "opt", "opt", POSITIVE + NEGATIVE + ["It was great terrible"] * 5)
    config = root / "ds.json"
    config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
        "tensorboard": {"enabled": True, "output_path": str(root / "tensorboard"), "job_name": "run"},
        "wandb": {"enabled": True, "project": "subzero-tests"},
        "subzero": {"lr": 1e-4, "eps": 1e-3, "rank": 4}}))
    with pytest.MonkeyPatch.context() as env:  # the launched process inherits these
        for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_SILENT": "true",
                           "WANDB_CONSOLE": "off"}.items():
            env.setenv(key, value)
        finished = run("python", 1, *train_command(root, "opt", root / "out", "--max_steps", "8",
                                                   "--deepspeed_config", str(config)))
    assert finished.returncode == 0, finished.stderr[-3000:]
    return root


def expected_events(output) -> dict[str, list[tuple[int, float]]]:
    """What the monitors should hold: every metrics.jsonl value as (step, value) under `subzero/<key>`."""
    events: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(output):
        for key, value in row.items():
            if key != "step":
                events.setdefault(f"subzero/{key}", []).append((row["step"], float(value)))
    return events


def test_tensorboard_gets_every_metrics_row_under_subzero_names(monitored_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    expected = expected_events(monitored_run / "out")
    assert {"subzero/loss", "subzero/loss_pos", "subzero/projected_grad", "subzero/eval_accuracy"} <= set(expected)
    (events_dir,) = {p.parent for p in (monitored_run / "tensorboard" / "run").rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(events_dir))
    accumulator.Reload()
    assert set(accumulator.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in accumulator.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag  # stored as float32


def wandb_history(run_file) -> dict[int, dict[str, float]]:
    """The history rows of an offline W&B run file, by step.

    The file is W&B's record log: a 7-byte header, then LevelDB-style 32 KiB blocks of chunks
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), each record a protobuf ``Record``.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    history, pending, position, block = {}, b"", 7, 32768
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # a block's padding
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history[int(items.pop("_step"))] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


def test_wandb_gets_every_metrics_row_under_subzero_names(monitored_run):
    (run_file,) = (monitored_run / "wandb").glob("offline-run-*/run-*.wandb")
    expected: dict[int, dict[str, float]] = {}
    for tag, points in expected_events(monitored_run / "out").items():
        for step, value in points:
            expected.setdefault(step, {})[tag] = value
    history = wandb_history(run_file)
    assert history.keys() == expected.keys()
    for step, row in expected.items():
        assert history[step] == pytest.approx(row, rel=1e-12), step
