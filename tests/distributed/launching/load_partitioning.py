"""Measure what ``subzero_ds.train`` materializes per rank while it loads the model (launched on 2 ranks).

Every ``nn.Parameter`` created during the load is tracked; the bytes they hold on this rank (the
full ``p.data`` plus the ZeRO-3 shard ``p.ds_tensor``) are summed each time a parameter is created
and each time DeepSpeed gathers parameters (transformers gathers each module to copy its
checkpoint values in), and once the load returns. The peak of that sum is the most parameter
bytes that were whole on this rank at once.

The load measured is the one ``subzero_ds.train.train`` makes, in its own order (its
``HfDeepSpeedConfig`` alive around ``models.load_model``): ``load_model`` is wrapped, and the run stops
right after it. As a control showing that the measurement can fail, the model is then loaded with
``load_model`` alone, without an ``HfDeepSpeedConfig``. Each rank writes ``<out>/rank-<k>.json``.
"""

import argparse
import contextlib
import json
import math
import weakref
from pathlib import Path

import deepspeed
import torch
from torch import nn

from subzero_ds import distributed, train
from subzero_ds.train import models

DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
             "subzero": {"lr": 1e-4, "rank": 4}}


def held_bytes(param: nn.Parameter) -> int:
    """Bytes of ``param`` on this rank: its data (empty when partitioned, full when gathered) and its shard."""
    shard = getattr(param, "ds_tensor", None)
    return (param.data.numel() + (shard.numel() if shard is not None else 0)) * param.element_size()


@contextlib.contextmanager
def parameter_bytes_tracker(peak: list[int]):
    """Within: ``peak[0]`` is the most parameter bytes this rank held at once (sampled, see the module doc)."""
    created: list[weakref.ref] = []
    original_new = nn.Parameter.__new__
    gathered = deepspeed.zero.GatheredParameters
    original_enter = gathered.__enter__

    def sample() -> None:
        peak[0] = max(peak[0], sum(held_bytes(p) for p in (ref() for ref in created) if p is not None))

    def tracking_new(cls, data=None, requires_grad=True):
        sample()  # the parameters made so far: partitioned by now, or still whole
        param = original_new(cls, data, requires_grad)
        created.append(weakref.ref(param))
        return param

    def tracking_enter(self):
        result = original_enter(self)
        sample()  # the gathered parameters are whole on every rank now
        return result

    nn.Parameter.__new__ = staticmethod(tracking_new)
    gathered.__enter__ = tracking_enter
    try:
        yield
        sample()
    finally:
        nn.Parameter.__new__ = original_new
        gathered.__enter__ = original_enter


def summary(model: nn.Module, peak: int) -> dict:
    world_size, _ = distributed.get_world_size_and_rank()
    params = list(model.parameters())
    full = [int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in params]
    partitioned = all(hasattr(p, "ds_tensor") for p in params)
    return {
        "peak_bytes": peak,
        "model_bytes": sum(full),
        "largest_param_bytes": max(full),
        "all_partitioned": partitioned,
        "placeholders_empty": partitioned and all(p.data.numel() == 0 for p in params),
        "shards_are_1_over_world": partitioned and all(
            int(p.ds_tensor.ds_numel) == math.ceil(p.ds_numel / world_size) for p in params),
    }


class _Loaded(Exception):
    """Raised right after train()'s load_model: the rest of the run is not needed."""


def measure_train_load(argv: list[str]) -> dict:
    """What ``train.train`` holds per rank while its ``load_model`` runs."""
    real_load_model = models.load_model  # the recipe calls it through its module: wrap it there
    measured = {}

    def measured_load_model(*args, **kwargs):
        peak = [0]
        with parameter_bytes_tracker(peak):
            model = real_load_model(*args, **kwargs)
        measured.update(summary(model, peak[0]))
        raise _Loaded

    models.load_model = measured_load_model
    try:
        train.train(train.parse_args(argv))
    except _Loaded:
        pass
    finally:
        models.load_model = real_load_model
    assert measured, "train.train never called load_model"
    return measured


def measure_without_hf_config(model_path: str) -> dict:
    peak = [0]
    with parameter_bytes_tracker(peak):
        model = models.load_model(model_path, masked_lm=False, dtype=torch.float32)
    return summary(model, peak[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    config = args.out / "ds.json"
    config.write_text(json.dumps(DS_CONFIG))
    argv = ["--model_name_or_path", args.model, "--task", "sst2", "--train_file", args.train_file,
            "--validation_file", args.train_file, "--deepspeed_config", str(config), "--output_dir",
            str(args.out / "run"), "--max_length", "32"]
    loaded = measure_train_load(argv)
    world_size, rank = distributed.get_world_size_and_rank()
    results = {"world_size": world_size, "train_load": loaded,
               "control_without_hf_config": measure_without_hf_config(args.model)}
    (args.out / f"rank-{rank}.json").write_text(json.dumps(results))
    distributed.exit_process(0)


if __name__ == "__main__":
    main()
