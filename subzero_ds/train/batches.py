"""The training data of a run: its samples, the seeded global batch of each step, each rank's share of it."""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator

from subzero_ds.distributed import disagreements
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


class RankBatches:
    """This rank's micro-batches of each step, encoded for the model.

    Of a step's global batch of ``micro_batches × world_size × per_device`` samples, micro-batch m of
    rank r is the rows [(m·world_size + r)·per_device, +per_device): a fixed share, so every world size
    and accumulation sees the same global batch.
    """

    def __init__(self, samples: list[Sample], seed: int, per_device: int, micro_batches: int, world_size: int,
                 rank: int, encode: Callable[[list[Sample]], dict[str, Any]]) -> None:
        self.per_device, self.micro_batches, self.world_size, self.rank = per_device, micro_batches, world_size, rank
        self.global_batch = per_device * micro_batches * world_size
        self.batches, self.encode = TaskBatches(samples, self.global_batch, seed), encode
        self.state = {"data_fingerprint": data_fingerprint(samples), "data_seed": seed,
                      "global_batch": self.global_batch}
        """What a checkpoint records, and a resume must match: the data, its order and the global batch."""

    def of_step(self, step: int) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches of step ``step`` (counted from 1)."""
        samples = self.batches.at(step - 1)
        for micro in range(self.micro_batches):
            first = (micro * self.world_size + self.rank) * self.per_device
            yield self.encode(samples[first : first + self.per_device])

    def check_ranks_agree(self) -> None:
        """Raises DataError if the ranks read different training data (the run would be silently wrong)."""
        if disagreements({"training data": self.state["data_fingerprint"]}):
            raise DataError("ranks disagree on the training data (different files or --seed/--num_train per rank): "
                            "every rank must read the same data, or the run is silently wrong. Pass the same "
                            "arguments.")


def data_fingerprint(samples: list[Sample]) -> int:
    """A hash of the training examples in order: ranks and resumed runs must agree on it."""
    return stable_seed(*(repr(sample) for sample in samples))
