"""1 rank ≡ 2 ranks under ZeRO-3 (deepspeed launcher), the project's correctness test.

mpirun runs the same cases in test_two_nodes.py (two nodes, a hostfile) against the same 1-rank reference."""

import pytest
import torch

from launch import REPO, run, trajectories
from trajectory import CASES
from trajectory_compare import assert_same_trajectory

pytestmark = pytest.mark.distributed
SCRIPT = str(REPO / "tests" / "distributed" / "launching" / "trajectory.py")


@pytest.fixture(scope="module")
def two_ranks_deepspeed(tmp_path_factory):
    return trajectories(tmp_path_factory, "deepspeed", 2)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_follow_the_one_rank_trajectory(one_rank, two_ranks_deepspeed, case):
    reference = one_rank[case]
    assert len(reference["losses"]) == 20
    assert_same_trajectory(reference, two_ranks_deepspeed[case])


def test_training_moved_the_weights(one_rank):
    from helpers.tiny import tiny_model

    initial = tiny_model("opt").state_dict()
    trained = one_rank["opt-zero3-subzero"]["state"]
    assert max((trained[k] - initial[k]).abs().max().item() for k in trained) > 1e-3


def test_lora_moves_only_the_adapter(two_ranks_deepspeed):
    from helpers.tiny import tiny_model

    initial = tiny_model("llama").state_dict()
    trained = two_ranks_deepspeed["llama-zero3-subzero-lora"]["state"]
    lora = [k for k in trained if "lora_B" in k]
    assert lora and all(trained[k].abs().max() > 1e-5 for k in lora)
    base = {k: v for k, v in trained.items() if "lora_" not in k}
    assert len(base) == len(initial)
    for name, tensor in base.items():
        assert torch.equal(tensor, initial[name.replace("base_model.model.", "", 1).replace(".base_layer", "")]), name


def test_stage0_and_stage3_agree_across_ranks(two_ranks_deepspeed):
    a, b = two_ranks_deepspeed["opt-zero0-subzero"], two_ranks_deepspeed["opt-zero3-subzero"]
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=1e-5, atol=1e-6)


def test_ranks_that_disagree_on_the_seed_are_stopped_at_initialize(tmp_path):
    finished = run("deepspeed", 2, SCRIPT, "--out", str(tmp_path / "x.pt"), "--cases", "opt-zero3-subzero",
                   "--seed_differs_per_rank")
    assert finished.returncode != 0
    output = finished.stdout + finished.stderr
    assert "ranks disagree on subzero.seed" in output
    assert not (tmp_path / "x.pt").exists()
