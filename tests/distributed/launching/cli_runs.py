"""What the CLI tests share: the tiny sentiment sentences, the subzero-train command and its metrics."""

import json

POSITIVE = ["a great and moving film", "wonderful acting and a fine story", "the best movie this year", "great fun"]
NEGATIVE = ["a dull and boring mess", "terrible acting and a bad story", "the worst movie this year", "bad and slow"]


def train_command(workspace, arch, output, *extra):
    return ("-m", "subzero_ds.train", "--model_name_or_path", str(workspace / arch), "--task", "sst2",
            "--train_file", str(workspace / "train.tsv"), "--validation_file", str(workspace / "dev.tsv"),
            "--max_steps", "12", "--log_steps", "4", "--eval_steps", "6", "--per_device_batch_size", "2",
            "--max_length", "48", "--output_dir", str(output), *extra)


def read_metrics(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
