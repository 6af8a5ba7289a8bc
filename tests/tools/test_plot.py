"""subzero-plot: a readable PNG of the right size from a mixed metrics.jsonl; bad files exit 2, no traceback."""

import json
import math

import pytest
from PIL import Image

from subzero_ds.tools.plot import main, moving_average, read_metrics


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def metrics_file(tmp_path):
    rows = [{"run": "header without a loss"}]
    for step in range(1, 41):
        rows.append({"step": step, "loss": 1.0 / step, "loss_pos": 1.1 / step, "projected_grad": 0.5, "lr": 1e-5})
        if step % 10 == 0:
            rows.append({"step": step, "eval_accuracy": 0.5 + step / 100, "eval_f1": 0.4 + step / 100, "eval_loss": 0.9})
    rows.append({"step": 41, "loss": 0.02, "eval_accuracy": 0.95})  # a row can be both
    return write_jsonl(tmp_path / "metrics.jsonl", rows)


def test_writes_a_png_matplotlib_and_pil_can_read(metrics_file, tmp_path, capsys):
    output = tmp_path / "plots" / "loss.png"  # the folder does not exist yet
    assert main([str(metrics_file), "-o", str(output)]) == 0
    assert output.stat().st_size > 10_000
    with Image.open(output) as image:
        assert image.format == "PNG"
        assert image.size == (800, 700)  # 8 x (2 panels * 3.2 + 0.6) inches at 100 dpi
    import matplotlib.image

    pixels = matplotlib.image.imread(output)
    assert pixels.shape[:2] == (700, 800) and pixels.std() > 0  # not a blank canvas
    assert str(output) in capsys.readouterr().out


def test_output_defaults_to_next_to_the_metrics_file(metrics_file):
    assert main([str(metrics_file)]) == 0
    assert metrics_file.with_suffix(".png").stat().st_size > 0


def test_training_rows_only_give_one_panel(tmp_path):
    metrics = write_jsonl(tmp_path / "m.jsonl", [{"step": s, "loss": 2.0 - s / 10} for s in range(10)])
    assert main([str(metrics), "-o", str(tmp_path / "one.png"), "--window", "3"]) == 0
    with Image.open(tmp_path / "one.png") as image:
        assert image.size == (800, 380)


def test_read_metrics_sorts_rows_into_series(metrics_file):
    metrics = read_metrics(metrics_file)
    assert metrics.train_loss.steps == list(range(1, 42))
    assert metrics.train_loss.values[:2] == [1.0, 0.5]
    assert set(metrics.evals) == {"eval_accuracy", "eval_f1", "eval_loss"}
    assert metrics.evals["eval_accuracy"].steps == [10, 20, 30, 40, 41]
    assert metrics.evals["eval_f1"].values == pytest.approx([0.5, 0.6, 0.7, 0.8])


def test_moving_average_is_trailing_and_skips_non_finite_values():
    assert moving_average([1, 2, 3, 4], 2) == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([1, 3, 5], 10) == [1.0, 2.0, 3.0]
    smooth = moving_average([math.nan, 2.0, math.inf, 4.0], 2)
    assert math.isnan(smooth[0]) and smooth[1:] == [2.0, 2.0, 4.0]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("", "is empty"),
        ("\n  \n", "is empty"),
        ('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4\n', "line 2: not valid JSON"),
        ('{"step": 1, "loss": 0.5}\n\n[1, 2]\n', "line 3: expected a JSON object, got list"),
        ('{"step": "one", "loss": 0.5}\n', 'line 1: `step` must be a number, got \'one\''),
        ('{"step": 1, "loss": null}\n', "line 1: `loss` must be a number, got None"),
        ('{"epoch": 1}\n{"note": "no metrics"}\n', "nothing to plot"),
    ],
)
def test_bad_files_exit_2_with_a_one_line_error(tmp_path, capsys, content, message):
    metrics = tmp_path / "metrics.jsonl"
    if content is not None:
        metrics.write_text(content)
    assert main([str(metrics), "-o", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("subzero-plot: error: ") and message in err and str(metrics) in err
    assert "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


def test_bad_window_is_a_usage_error(metrics_file, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main([str(metrics_file), "--window", "0"])
    assert excinfo.value.code == 2 and "--window must be >= 1, got 0" in capsys.readouterr().err
