"""The fused ± pass gathers each ZeRO-3 layer once per step; the in-place passes gather it twice.

One launch (2 ranks, ZeRO-3, ``stage3_param_persistence_threshold: 0`` so that every parameter
is partitioned) runs this file as a script: it counts, over steps 2-4 of each mode (step 1
traces the modules), how often each parameter is all-gathered and how many bytes DeepSpeed's
communication backend gathers, and how many all-reduces the step issues.
"""

import functools
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
STEPS = 3


class GatherCounter:
    """Counts all-gathers per parameter and all-gathered bytes/all-reduces while :attr:`active`.

    Per parameter: ZeRO-3 fetches a module's parameters with ``param.all_gather_coalesced(params)``
    (one collective for the group). Bytes: every all-gather of ``deepspeed.comm`` (which any other
    gather, e.g. ``GatheredParameters``, also goes through), counted by its output tensor.
    """

    GATHERS = ("allgather_fn", "all_gather_into_tensor", "all_gather", "all_gather_coalesced")

    def __init__(self, params) -> None:
        import deepspeed.comm
        import torch.distributed

        self.active, self.depth = False, 0
        self.per_param, self.gathered_bytes, self.all_reduces = Counter(), 0, []
        self.names = {id(p): name for name, p in params}
        for _, param in params:
            param.all_gather_coalesced = self._per_param(param.all_gather_coalesced)
        for name in self.GATHERS:
            setattr(deepspeed.comm, name, self._collective(getattr(deepspeed.comm, name), gather=True))
        deepspeed.comm.all_reduce = self._collective(deepspeed.comm.all_reduce, gather=False)
        torch.distributed.all_reduce = self._collective(torch.distributed.all_reduce, gather=False)

    def _per_param(self, gather):
        @functools.wraps(gather)
        def counted(params, *args, **kwargs):
            if self.active:
                self.per_param.update(self.names[id(p)] for p in params)
            return gather(params, *args, **kwargs)

        return counted

    def _collective(self, fn, gather: bool):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.active and self.depth == 0:
                if gather:
                    output = args[0] if args else next(iter(kwargs.values()))
                    tensors = output if isinstance(output, (list, tuple)) else [output]
                    self.gathered_bytes += sum(t.numel() * t.element_size() for t in tensors)
                else:
                    tensor = args[0] if args else kwargs["tensor"]
                    self.all_reduces.append(tensor.numel())
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1

        return counted


def count_steps(fused: bool) -> dict:
    """This rank's gather counts over ``STEPS`` steps after a first, tracing one."""
    import subzero_ds
    from helpers.tiny import pattern_batch, rank_slice, tiny_model
    from subzero_ds.distributed import get_world_size_and_rank

    config = {"train_micro_batch_size_per_gpu": 2,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "subzero": {"lr": 1e-4, "eps": 1e-3, "rank": 4, "seed": 1, "fused": fused}}
    engine = subzero_ds.initialize(model=tiny_model("llama"), config=config)
    world_size, rank = get_world_size_and_rank()
    params = list(engine.module.named_parameters())
    counter = GatherCounter(params)
    batch = lambda step: rank_slice(pattern_batch(4, seed=step), rank, world_size)  # noqa: E731
    engine.step(batch(0))
    counter.active = True
    for step in range(1, STEPS + 1):
        engine.step(batch(step))
    counter.active = False
    return {
        "per_param": {name: counter.per_param[name] for name, _ in params},
        "partitioned": {name: not p.ds_persist for name, p in params},
        # what one gather of the parameter lands on this rank: its padded partitions of every rank
        "gather_bytes": {name: p.ds_tensor.ds_numel * world_size * p.element_size() for name, p in params},
        "gathered_bytes": counter.gathered_bytes,
        "all_reduces": counter.all_reduces,
    }


def main(out: str) -> None:
    from subzero_ds.distributed import exit_process, get_world_size_and_rank

    counts = {"fused": count_steps(True), "in_place": count_steps(False)}
    _, rank = get_world_size_and_rank()
    Path(f"{out}.{rank}").write_text(json.dumps(counts))
    exit_process(0)


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    from launch import run

    out = tmp_path_factory.mktemp("gathers") / "counts"
    finished = run("ranks", 2, __file__, str(out))
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("mode,gathers", [("fused", 1), ("in_place", 2)])
def test_each_partitioned_parameter_is_gathered_once_fused_and_twice_in_place(counts, mode, gathers):
    for rank_counts in counts:
        run = rank_counts[mode]
        assert all(run["partitioned"].values())  # persistence threshold 0: nothing stays gathered
        assert run["per_param"] == {name: gathers * STEPS for name in run["per_param"]}
        # and no other gather moves bytes: the backend's total is exactly those gathers
        assert run["gathered_bytes"] == gathers * STEPS * sum(run["gather_bytes"].values())


def test_fused_gathers_half_the_bytes_of_in_place(counts):
    for rank_counts in counts:
        assert 2 * rank_counts["fused"]["gathered_bytes"] == rank_counts["in_place"]["gathered_bytes"] > 0


@pytest.mark.parametrize("mode", ["fused", "in_place"])
def test_a_step_all_reduces_one_pair_of_scalars(counts, mode):
    for rank_counts in counts:
        assert rank_counts[mode]["all_reduces"] == [2] * STEPS


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])  # the deepspeed launcher adds it
