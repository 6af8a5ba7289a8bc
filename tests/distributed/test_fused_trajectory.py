"""The fused ± pass follows the in-place trajectory: 1 rank and 2 ranks, every case of trajectory.py."""

import json

import pytest
import torch

from launch import REPO, run
from trajectory import CASES
from trajectory_compare import assert_same_trajectory

pytestmark = pytest.mark.distributed
SCRIPT = str(REPO / "tests" / "distributed" / "launching" / "trajectory.py")


def trajectories(tmp_path_factory, launcher: str, nprocs: int, fused: bool) -> dict:
    out = tmp_path_factory.mktemp(f"{launcher}-fused-{fused}") / "trajectories.pt"
    finished = run(launcher, nprocs, SCRIPT, "--out", str(out), "--subzero", json.dumps({"fused": fused}))
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return torch.load(out)["results"]


@pytest.fixture(scope="module")
def fused_one_rank(tmp_path_factory):
    return trajectories(tmp_path_factory, "python", 1, fused=True)


@pytest.fixture(scope="module")
def fused_two_ranks(tmp_path_factory):
    return trajectories(tmp_path_factory, "ranks", 2, fused=True)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_one_rank_follows_the_in_place_trajectory(one_rank, fused_one_rank, case):
    assert len(fused_one_rank[case]["losses"]) == 20
    assert_same_trajectory(one_rank[case], fused_one_rank[case])


@pytest.mark.parametrize("case", list(CASES))
def test_fused_two_ranks_follow_the_in_place_trajectory(one_rank, fused_two_ranks, case):
    assert_same_trajectory(one_rank[case], fused_two_ranks[case])
