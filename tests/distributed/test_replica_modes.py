"""``"replica_mode": "perturbation"``: R replica groups each evaluate their own q directions on the same batch, and
every rank applies the mean of the R·q updates: the ``queries: R·q`` estimator in the time of q.

- 4 ranks as 2 hpZ groups × 2, q = 1 ≡ ``queries: 2`` on 2 plain ZeRO-3 ranks with the same batch (bit for bit:
  the same forwards on the same rows, the same losses summed in another order of zeros);
- ZeRO-0, 2 ranks (each rank a group of its own, the whole batch), q = 1 ≡ ``queries: 2`` on 1 rank;
- a checkpoint written in data mode resumes in perturbation mode, which estimates the same directions.
"""

import json

import pytest
import torch

from launch import REPO, run

pytestmark = pytest.mark.distributed
SCRIPT = str(REPO / "tests" / "distributed" / "launching" / "hpz_trajectories.py")
CASES = ["subzero", "subzero-fused", "mezo-persistent"]
PERTURBATION = '{"replica_mode": "perturbation"}'
TWO_QUERIES = '{"queries": 2}'


def launch(nprocs: int, out, *args: str) -> dict:
    finished = run("ranks", nprocs, SCRIPT, "--out", str(out), *args, timeout=420)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return torch.load(out)["results"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    return {
        "data": launch(2, root / "data.pt", "--cases", *CASES, "--subzero", TWO_QUERIES, "--checkpoint", str(root / "ck")),
        "perturbation": launch(4, root / "perturbation.pt", "--hpz", "2", "--cases", *CASES, "--subzero", PERTURBATION),
        "resumed": launch(4, root / "resumed.pt", "--hpz", "2", "--cases", *CASES, "--subzero", PERTURBATION,
                          "--resume_from", str(root / "ck")),
        "zero0-one-rank": launch(1, root / "zero0-1.pt", "--cases", "subzero-zero0", "--subzero", TWO_QUERIES),
        "zero0-perturbation": launch(2, root / "zero0-2.pt", "--cases", "subzero-zero0", "--subzero", PERTURBATION),
    }


def assert_identical(a: dict, b: dict) -> None:
    assert a["losses"] == b["losses"]
    assert a["grads"] == b["grads"]
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][name], b["state"][name]) for name in a["state"])


@pytest.mark.parametrize("case", CASES)
def test_perturbation_mode_on_hpz_groups_is_the_two_query_estimator(runs, case):
    perturbation = runs["perturbation"][case]
    assert all(len(grads) == 2 for grads in perturbation["grads"])  # 2 groups × 1 direction each
    assert all(g0 != g1 for g0, g1 in perturbation["grads"])  # two directions, not one twice
    assert perturbation["stale"] == [0] * len(perturbation["losses"])
    assert_identical(runs["data"][case], perturbation)


def test_perturbation_mode_under_zero0_gives_every_rank_its_own_direction(runs):
    assert_identical(runs["zero0-one-rank"]["subzero-zero0"], runs["zero0-perturbation"]["subzero-zero0"])


@pytest.mark.parametrize("case", CASES)
def test_a_data_mode_checkpoint_resumes_in_perturbation_mode(runs, case):
    uninterrupted, resumed = runs["data"][case], runs["resumed"][case]
    assert resumed["losses"] == uninterrupted["losses"][-len(resumed["losses"]):]
    assert all(torch.equal(resumed["state"][name], t) for name, t in uninterrupted["state"].items())


# ---- the training CLI: a replica group's ranks share one batch ----------------------------------------------

def test_cli_perturbation_mode_gives_each_group_the_same_batch(tmp_path):
    """2 ranks under ZeRO-0 in perturbation mode (each rank a group: the whole batch, its own direction) ≡ 1 rank
    with ``queries: 2``, through ``python -m subzero_ds.train``: the same metrics and the same final weights."""
    from safetensors.torch import load_file

    from cli_runs import NEGATIVE, POSITIVE, read_metrics, train_command
    from helpers.tiny import save_tiny_pretrained

    rows = [(t, 1) for t in POSITIVE] + [(t, 0) for t in NEGATIVE]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows * 4))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    save_tiny_pretrained(tmp_path / "llama", "llama", POSITIVE + NEGATIVE + ["It was great terrible"] * 5)
    outputs = {}
    for name, nprocs, subzero in (("one", 1, {"queries": 2}), ("perturbation", 2, {"replica_mode": "perturbation"})):
        config = tmp_path / f"{name}.json"
        config.write_text(json.dumps({"zero_optimization": {"stage": 0},
                                      "subzero": {"lr": 1e-3, "eps": 1e-3, "rank": 4, "seed": 3, **subzero}}))
        outputs[name] = tmp_path / name
        finished = run("ranks", nprocs, *train_command(tmp_path, "llama", outputs[name], "--deepspeed_config",
                                                       str(config), "--eval_steps", "100"), timeout=420)
        assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "each of the 2 replica groups the same batch" in finished.stdout + finished.stderr
    one, perturbation = read_metrics(outputs["one"]), read_metrics(outputs["perturbation"])
    steps = [row for row in perturbation if "projected_grads" in row]
    assert steps and all(len(row["projected_grads"]) == 2 for row in steps)
    fields = ("step", "loss_pos", "loss_neg", "projected_grads")
    assert [{k: r.get(k) for k in fields} for r in one if "loss_pos" in r] == [{k: r.get(k) for k in fields}
                                                                             for r in perturbation if "loss_pos" in r]
    a, b = (load_file(outputs[name] / "final" / "model.safetensors") for name in ("one", "perturbation"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
