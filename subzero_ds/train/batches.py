"""The training data of a run: its samples, the seeded global batch of each step, and their fingerprint."""

from __future__ import annotations

import argparse
import random

from subzero_ds.seeds import stable_seed
from subzero_ds.tasks import DataError, Sample, load_samples


def load_data(args: argparse.Namespace, task) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train, dev, eval) samples; dev is held out of train."""
    train = load_samples(task, "train", data_dir=args.data_dir, file=args.train_file,
                         limit=(args.num_train + args.num_dev) or None, seed=args.seed)
    dev, train = train[: args.num_dev], train[args.num_dev :]
    eval_file = args.test_file or args.validation_file
    evaluation = load_samples(task, "test" if args.test_file else "validation", data_dir=args.data_dir,
                              file=eval_file, limit=args.num_eval or None, seed=args.seed)
    if not train:
        raise DataError(f"no training examples left for task {task.name!r} after holding out --num_dev {args.num_dev}")
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
