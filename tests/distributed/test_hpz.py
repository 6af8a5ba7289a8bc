"""ZeRO++ hpZ (``zero_hpz_partition_size``): 4 ranks as 2 groups × 2 ≡ plain ZeRO-3 ≡ 1 rank, never stale, and
no layer gathered across the groups.

Without subzero_ds writing hpZ's secondary copy, forwards gather the initial weights forever: ℓ+ = ℓ−, g = 0, and
nothing trains, silently. The trajectories come from launching/hpz_trajectories.py (SubZero and MeZO, in place
and fused, bf16 with stochastic rounding, CPU offload, persistent parameters, Adam and momentum, whose state is
kept for the secondary range too); this file, run as a script on 4 ranks, counts the bytes each process group
gathers.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import REPO, run
from trajectory_compare import assert_same_trajectory

pytestmark = pytest.mark.distributed
SCRIPT = str(REPO / "tests" / "distributed" / "launching" / "hpz_trajectories.py")
CASES = ["subzero", "subzero-fused", "mezo-persistent", "subzero-bf16-stochastic", "subzero-offload-cpu",
         "subzero-adam", "mezo-momentum"]
RESUME_AT, STEPS = 5, 8


def launch(nprocs: int, out: Path, *args: str) -> dict:
    finished = run("ranks", nprocs, SCRIPT, "--out", str(out), *args, timeout=420)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    saved = torch.load(out)
    assert saved["world_size"] == nprocs
    return saved["results"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case on 1 rank, 2 and 4 plain ranks and 4 hpZ ranks (checkpointed at step 5, exported), and the
    hpZ run resumed from that checkpoint on 4 hpZ ranks and on 2 plain ones."""
    root = tmp_path_factory.mktemp("hpz")
    checkpoints = root / "checkpoints"
    return {
        "one": launch(1, root / "1.pt"),
        "plain2": launch(2, root / "2.pt", "--export", str(root / "export2")),
        "plain4": launch(4, root / "4.pt"),
        "hpz": launch(4, root / "hpz.pt", "--hpz", "2", "--checkpoint", str(checkpoints), "--export", str(root / "export")),
        "hpz-resumed": launch(4, root / "hpz-resumed.pt", "--hpz", "2", "--resume_from", str(checkpoints)),
        "plain2-resumed": launch(2, root / "2-resumed.pt", "--resume_from", str(checkpoints)),
        "root": root,
    }


@pytest.mark.parametrize("case", CASES)
def test_hpz_is_bit_identical_to_plain_zero3_on_the_same_ranks(runs, case):
    hpz, plain = runs["hpz"][case], runs["plain4"][case]
    assert hpz["losses"] == plain["losses"]
    assert all(torch.equal(hpz["state"][name], tensor) for name, tensor in plain["state"].items())


@pytest.mark.parametrize("case", [c for c in CASES if "bf16" not in c])
def test_hpz_follows_plain_zero3_and_one_rank(runs, case):
    assert_same_trajectory(runs["one"][case], runs["hpz"][case])
    assert_same_trajectory(runs["one"][case], runs["plain2"][case])


def test_bf16_hpz_stays_within_rounding_of_one_rank(runs):
    """bf16 forwards on 2-row shares differ from 8-row ones by a rounding, which g = Δℓ/2ε amplifies: the same
    trajectory to bf16 precision, as plain ZeRO-3 on 2 ranks is."""
    reference = runs["one"]["subzero-bf16-stochastic"]
    for run_name in ("hpz", "plain2"):
        other = runs[run_name]["subzero-bf16-stochastic"]
        torch.testing.assert_close(torch.tensor(other["losses"]), torch.tensor(reference["losses"]), rtol=0, atol=5e-3)
        for name, tensor in reference["state"].items():
            torch.testing.assert_close(other["state"][name].float(), tensor.float(), rtol=0, atol=3e-2)


@pytest.mark.parametrize("case", CASES)
def test_the_secondary_copy_is_never_stale(runs, case):
    hpz = runs["hpz"][case]
    assert hpz["secondary_ranges"] > 0  # DeepSpeed did build secondary copies
    assert hpz["stale"] == [0] * STEPS  # after every step, on every rank
    assert runs["hpz-resumed"][case]["stale"] == [0] * (STEPS - RESUME_AT)
    losses = torch.tensor(hpz["losses"])
    assert (losses[:, 0] != losses[:, 1]).all()  # the probes saw the perturbation: ℓ+ ≠ ℓ−


def test_in_place_probes_under_hpz_back_up_only_the_copy_forwards_read(runs):
    """Persistence 0: every parameter is partitioned, and forwards read only the secondary copies, so probes leave
    the shards at θ and back up none of them (plain ZeRO-3 backs up every shard)."""
    hpz, plain = runs["hpz"]["subzero"], runs["plain4"]["subzero"]
    assert hpz["shard_backups"] == 0 and plain["shard_backups"] == plain["shards"] > 0


@pytest.mark.parametrize("case", CASES)
def test_resume_is_bit_exact_on_hpz_and_follows_on_plain_ranks(runs, case):
    uninterrupted, resumed = runs["hpz"][case], runs["hpz-resumed"][case]
    assert resumed["losses"] == uninterrupted["losses"][RESUME_AT:]
    assert all(torch.equal(resumed["state"][name], t) for name, t in uninterrupted["state"].items())
    atol = 3e-2 if "bf16" in case else 1e-5
    for name, tensor in uninterrupted["state"].items():
        torch.testing.assert_close(runs["plain2-resumed"][case]["state"][name].float(), tensor.float(), rtol=0, atol=atol)


def test_export_equals_the_trained_weights(runs):
    exported = load_file(runs["root"] / "export" / "subzero" / "model.safetensors")
    trained = runs["hpz"]["subzero"]["state"]
    assert exported and all(torch.equal(exported[name], trained[name]) for name in exported)
    plain = load_file(runs["root"] / "export2" / "subzero" / "model.safetensors")
    for name, tensor in plain.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=1e-5)


# ---- bytes gathered per process group: run as a script on 4 ranks ------------------------------------------

GATHER_STEPS = 3


def count_gathers(fused: bool, hpz: int) -> dict:
    """Bytes this rank gathered over each process group in ``GATHER_STEPS`` steps after a first one."""
    from helpers.gathers import counted_steps

    engine, counter = counted_steps({"zero_hpz_partition_size": hpz} if hpz > 1 else {}, fused, GATHER_STEPS,
                                    global_batch=8)
    model_bytes = sum(p.ds_numel * p.element_size() for p in engine.module.parameters())
    return {"by_group": {json.dumps(ranks): moved for ranks, moved in counter.gathered_by_group.items()},
            "model_bytes": model_bytes, "all_reduces": counter.all_reduces}


def main(out: str) -> None:
    from subzero_ds.distributed import exit_process, get_world_size_and_rank, init_distributed

    init_distributed()
    counts = {f"{mode}-{hpz}": count_gathers(mode == "fused", hpz) for mode in ("fused", "in_place") for hpz in (1, 2)}
    Path(f"{out}.{get_world_size_and_rank()[1]}").write_text(json.dumps(counts))
    exit_process(0)


@pytest.fixture(scope="module")
def gathers(tmp_path_factory):
    out = tmp_path_factory.mktemp("gathers") / "counts"
    finished = run("ranks", 4, __file__, str(out), timeout=420)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(4)]


@pytest.mark.parametrize("mode,forwards", [("fused", 1), ("in_place", 2)])
def test_hpz_gathers_nothing_across_groups(gathers, mode, forwards):
    for rank, counts in enumerate(gathers):
        hpz, plain = counts[f"{mode}-2"], counts[f"{mode}-1"]
        own_group = json.dumps([0, 1] if rank < 2 else [2, 3])
        assert set(hpz["by_group"]) == {own_group}, hpz["by_group"]  # not one byte over the world
        # each forward gathers the whole model (padded) inside the group, as plain ZeRO-3 gathers it over the world
        assert hpz["by_group"][own_group] >= forwards * GATHER_STEPS * hpz["model_bytes"]
        assert set(plain["by_group"]) == {json.dumps([0, 1, 2, 3])}
        assert plain["by_group"][json.dumps([0, 1, 2, 3])] >= forwards * GATHER_STEPS * plain["model_bytes"]
        assert hpz["all_reduces"] == plain["all_reduces"]  # hpZ adds no collective to a step


if __name__ == "__main__":
    main(sys.argv[1])


# ---- the training CLI: weights partitioned while loading (zero.Init forms hpZ's groups) -----------------------

def test_cli_hpz_run_is_bit_identical_to_plain_zero3(tmp_path):
    """``python -m subzero_ds.train`` on 4 ranks with hpZ 2 (the model partitioned as it loads, through
    ``HfDeepSpeedConfig``) writes the metrics and final weights of the same run under plain ZeRO-3."""
    from cli_runs import NEGATIVE, POSITIVE, read_metrics, train_command
    from helpers.tiny import save_tiny_pretrained

    rows = [(t, 1) for t in POSITIVE] + [(t, 0) for t in NEGATIVE]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows * 4))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    save_tiny_pretrained(tmp_path / "llama", "llama", POSITIVE + NEGATIVE + ["It was great terrible"] * 5)
    outputs = {}
    for name, zero in (("plain", {}), ("hpz", {"zero_hpz_partition_size": 2})):
        config = tmp_path / f"{name}.json"
        config.write_text(json.dumps({
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, **zero},
            "subzero": {"lr": 1e-3, "eps": 1e-3, "rank": 4, "seed": 3}}))
        outputs[name] = tmp_path / name
        finished = run("ranks", 4, *train_command(tmp_path, "llama", outputs[name], "--deepspeed_config", str(config),
                                                  "--per_device_batch_size", "1", "--eval_steps", "100"), timeout=420)
        assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
        assert ("ZeRO++ hpZ secondary copies of" in finished.stdout + finished.stderr) == (name == "hpz")
    plain, hpz = (read_metrics(outputs[name]) for name in ("plain", "hpz"))
    steps = [{k: row[k] for k in ("step", "loss_pos", "loss_neg", "projected_grad")} for row in hpz if "loss_pos" in row]
    assert steps and all(row["loss_pos"] != row["loss_neg"] for row in steps)  # it trains: the probes differ
    assert steps == [{k: row[k] for k in ("step", "loss_pos", "loss_neg", "projected_grad")}
                     for row in plain if "loss_pos" in row]
    a, b = (load_file(outputs[name] / "final" / "model.safetensors") for name in ("plain", "hpz"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
