"""Any AutoModelForCausalLM, no special code: GPT-2, Mistral and Qwen2 on 1 and 2 ranks, and
models partitioned while they load (HfDeepSpeedConfig), never whole on one rank."""

import json

import pytest
import torch

from architecture_trajectories import CASES, STEPS
from launch import REPO, run
from trajectory_compare import assert_same_trajectory

pytestmark = pytest.mark.distributed
SCRIPT = str(REPO / "tests" / "distributed" / "launching" / "architecture_trajectories.py")


def trajectories(tmp_path_factory, launcher: str, nprocs: int) -> dict:
    out = tmp_path_factory.mktemp(f"architectures-{launcher}") / "trajectories.pt"
    finished = run(launcher, nprocs, SCRIPT, "--out", str(out), "--steps", str(STEPS))
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    saved = torch.load(out)
    assert saved["world_size"] == nprocs
    return saved["results"]


@pytest.fixture(scope="module")
def one_rank_architectures(tmp_path_factory):
    return trajectories(tmp_path_factory, "python", 1)


@pytest.fixture(scope="module")
def two_ranks_architectures(tmp_path_factory):
    return trajectories(tmp_path_factory, "ranks", 2)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_follow_the_one_rank_trajectory(one_rank_architectures, two_ranks_architectures, case):
    from helpers.tiny import tiny_model

    reference = one_rank_architectures[case]
    assert len(reference["losses"]) == STEPS
    initial = tiny_model(CASES[case][0]).state_dict()
    assert max((reference["state"][k] - initial[k]).abs().max().item() for k in initial) > 1e-3  # it trained
    assert_same_trajectory(reference, two_ranks_architectures[case])


@pytest.fixture(scope="module")
def load_measurements(tmp_path_factory):
    from helpers.tiny import save_tiny_pretrained

    root = tmp_path_factory.mktemp("load")
    rows = ["a great film\t1", "a dull film\t0"] * 4
    (root / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    # 6 layers of width 128: the largest parameter is a few % of the model, so "whole" and "half" are far apart.
    save_tiny_pretrained(root / "model", "llama", ["a great film", "a dull film", "It was great terrible"] * 5,
                         hidden=128, layers=6)
    finished = run("ranks", 2, str(REPO / "tests" / "distributed" / "launching" / "load_partitioning.py"),
                   "--model", str(root / "model"), "--train_file", str(root / "train.tsv"), "--out", str(root))
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return [json.loads((root / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


def test_the_cli_loads_the_model_partitioned_never_whole_on_a_rank(load_measurements):
    for rank, measured in enumerate(load_measurements):
        loaded, control = measured["train_load"], measured["control_without_hf_config"]
        assert loaded["all_partitioned"] and loaded["placeholders_empty"] and loaded["shards_are_1_over_world"], rank
        # At most this rank's half plus one gathered parameter (and its own shard of it) at any time …
        bound = loaded["model_bytes"] / 2 + 2 * loaded["largest_param_bytes"]
        assert loaded["peak_bytes"] <= bound, (rank, loaded)
        # … while the same measurement sees the whole model when nothing partitions it at load time.
        assert control["peak_bytes"] >= control["model_bytes"] and not control["all_partitioned"], (rank, control)
