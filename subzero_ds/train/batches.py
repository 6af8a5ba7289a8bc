"""The training data of a run: its samples, the seeded global batch of each step, and their fingerprint."""

from __future__ import annotations

import random

from subzero_ds.seeds import stable_seed
from subzero_ds.tasks import DataError, Sample, Task, load_samples

from .args import DataArgs


def load_data(data: DataArgs, task: Task) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train, dev, eval) samples; dev is held out of train.

    Raises:
        DataError: a file or row the task cannot read, or no training example left after --num_dev.
    """
    train = load_samples(task, "train", data_dir=data.data_dir, file=data.train_file,
                         limit=(data.num_train + data.num_dev) or None, seed=data.seed)
    dev, train = train[: data.num_dev], train[data.num_dev :]
    evaluation = load_samples(task, data.eval_split, data_dir=data.data_dir,
                              file=data.test_file or data.validation_file, limit=data.num_eval or None, seed=data.seed)
    if not train:
        raise DataError(f"no training examples left for task {task.name!r} after holding out --num_dev {data.num_dev}")
    return train, dev, evaluation


class TaskBatches:
    """Seeded, epoch-wise shuffled global batches; each rank takes its equal share."""

    def __init__(self, samples: list[Sample], global_batch: int, seed: int) -> None:
        self.samples, self.global_batch, self.seed = samples, global_batch, seed

    def at(self, step: int) -> list[Sample]:
        """The global batch of ``step`` (a pure function of the step: resumable)."""
        per_epoch = max(1, len(self.samples) // self.global_batch)
        epoch, index = divmod(step, per_epoch)
        order = list(range(len(self.samples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        picks = [order[(index * self.global_batch + i) % len(order)] for i in range(self.global_batch)]
        return [self.samples[i] for i in picks]


def data_fingerprint(samples: list[Sample]) -> int:
    """A hash of the training examples in order: ranks and resumed runs must agree on it."""
    return stable_seed(*(repr(sample) for sample in samples))
