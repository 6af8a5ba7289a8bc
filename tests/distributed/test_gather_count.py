"""The fused ± pass gathers each ZeRO-3 layer once per step; the in-place passes gather it twice.

One launch (2 ranks, ZeRO-3, ``stage3_param_persistence_threshold: 0`` so that every parameter
is partitioned) runs this file as a script: it counts, over steps 2-4 of each mode (step 1
traces the modules), how often each parameter is all-gathered and how many bytes DeepSpeed's
communication backend gathers, and how many all-reduces the step issues: with the benchmarks'
collective counter (bench/harness/collectives.py, on the path tests/conftest.py sets).
"""

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
STEPS = 3


def count_steps(fused: bool) -> dict:
    """This rank's gather counts over ``STEPS`` steps after a first, tracing one."""
    from helpers.gathers import counted_steps
    from subzero_ds.distributed import get_world_size_and_rank

    engine, counter = counted_steps({}, fused, STEPS, global_batch=4)
    world_size, _ = get_world_size_and_rank()
    params = list(engine.module.named_parameters())
    return {
        "per_param": {name: counter.parameter_gathers[name] for name, _ in params},
        "partitioned": {name: not p.ds_persist for name, p in params},
        # what one gather of the parameter lands on this rank: its padded partitions of every rank
        "gather_bytes": {name: p.ds_tensor.ds_numel * world_size * p.element_size() for name, p in params},
        "gathered_bytes": counter.gathered,
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
