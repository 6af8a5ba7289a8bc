"""The planner's step time: gathers within and across nodes, plain ZeRO-3 against ZeRO++ hpZ, its advice and flags."""

from __future__ import annotations

import json
import re

import pytest

from subzero_ds import memory
from subzero_ds.memory import BatchShape, Cluster, MemoryPlanError, Offload, ZeroSettings, estimate, zo_step
from subzero_ds.config import SubZeroConfig
from subzero_ds.memory.step_time import LOSS_PAIR_BYTES

GiB = memory.GiB
BATCH = BatchShape(4, 512)


def settings(hpz: int = 1, fused: bool = False, **kwargs) -> ZeroSettings:
    return ZeroSettings(hpz_partition_size=hpz, **kwargs).with_fused(fused)


def model_bytes(name: str) -> int:
    return memory.BUILTIN_MODELS[name].total_params * 2  # bf16


@pytest.fixture
def config_file(tmp_path):
    def write(**zero) -> str:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, **zero},
                                    "subzero": {"method": "subzero"}}))  # fmt: skip
        return str(path)

    return write


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = memory.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def seconds_per_step(report: str) -> float:
    return float(re.search(r"= ([0-9.]+) s per step", report).group(1))


# --- bytes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [2, 4, 16])
def test_hpz_sends_only_the_loss_scalars_across_nodes_after_the_first_forward(nodes):
    cluster = Cluster(nodes, 8)
    plain = estimate("opt-30b", settings(), cluster, BATCH).step
    hpz = estimate("opt-30b", settings(hpz=8), cluster, BATCH).step
    m = model_bytes("opt-30b")
    assert plain.across_node_bytes_per_step >= m  # two gathers, each (N - 8)/N of the model from other nodes
    assert hpz.across_node_bytes == 0 and hpz.across_node_bytes_per_step == LOSS_PAIR_BYTES * nodes < 1024
    assert hpz.first_across_node_bytes == plain.across_node_bytes > 0  # the first forward is a plain gather
    assert hpz.within_node_bytes == pytest.approx(m * 7 / 8)  # all of the model but this rank's 1/8, over NVLink
    for t, group in ((plain, 8 * nodes), (hpz, 8)):
        assert t.within_node_bytes + t.across_node_bytes == pytest.approx(m * (group - 1) / group)


def test_one_node_gathers_over_nvlink_only():
    step = estimate("opt-13b", settings(), Cluster(1, 8), BATCH).step
    assert step.across_node_bytes == 0 and step.link_gbps == Cluster().intra_node_gbps


def test_an_hpz_group_of_two_nodes_gathers_across_them():
    step = estimate("opt-13b", settings(hpz=16), Cluster(4, 8), BATCH).step
    assert step.group == 16 and step.replicas == 2
    assert step.across_node_bytes == pytest.approx(model_bytes("opt-13b") * 8 / 16)
    assert step.link_gbps == Cluster().inter_node_gbps


# --- time ----------------------------------------------------------------------------------------


def test_plain_slows_down_with_the_network_and_hpz_does_not(capsys, config_file):
    config = config_file()
    times = {}
    for mode in ("0", "8"):
        for gbps in ("400", "200", "100"):
            code, out, _ = run(capsys, "--model", "opt-30b", "--config", config, "--nodes", "4", "--batch-size", "4",
                               "--hpz-partition-size", mode, "--inter-node-gbps", gbps)  # fmt: skip
            assert code == 0
            times[mode, gbps] = seconds_per_step(out)
    assert times["0", "400"] < times["0", "200"] < times["0", "100"]
    assert times["8", "400"] == times["8", "200"] == times["8", "100"] < times["0", "400"] / 2


def test_comm_and_compute_follow_their_formulas():
    arch, cluster = memory.BUILTIN_MODELS["opt-66b"], Cluster(2, 8)
    in_place = estimate(arch, settings(), cluster, BATCH).step
    fused = estimate(arch, settings(fused=True), cluster, BATCH).step
    m, n = model_bytes("opt-66b"), cluster.world
    assert in_place.comm_s == pytest.approx(2 * m * (n - 1) / n / (cluster.inter_node_gbps * 1e9 / 8))
    assert fused.comm_s == pytest.approx(in_place.comm_s / 2)  # one forward over the doubled batch: one gather
    assert in_place.compute_s == fused.compute_s == pytest.approx(4 * arch.total_params * 4 * 512 / 400e12)
    half = estimate(arch, settings(), Cluster(2, 8, tflops=200), BATCH).step
    assert half.compute_s == pytest.approx(2 * in_place.compute_s) and half.comm_s == in_place.comm_s
    assert in_place.total_s == in_place.comm_s + in_place.compute_s


# --- memory --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_hpz_adds_one_kth_of_the_model_per_gpu(fused):
    cluster = Cluster(2, 8)
    plain = estimate("opt-66b", settings(fused=fused), cluster, BATCH)
    hpz = estimate("opt-66b", settings(hpz=8, fused=fused), cluster, BATCH)
    secondary = zo_step.shard_elements(plain.architecture, 8) * 2
    assert secondary == pytest.approx(model_bytes("opt-66b") / 8, rel=1e-6)
    # In place, probes perturb only the secondary copy forwards read: exact restore backs it up instead of the shard.
    shard = zo_step.shard_elements(plain.architecture, 16) * 2
    extra = secondary if fused else 2 * secondary - shard
    assert hpz.total("gpu") - plain.total("gpu") == extra
    assert hpz.total("cpu") == plain.total("cpu")


def test_hpz_copies_live_in_cpu_memory_under_cpu_offload():
    cluster = Cluster(2, 8)
    plain = estimate("opt-66b", settings(offload=Offload.CPU), cluster, BATCH)
    hpz = estimate("opt-66b", settings(hpz=8, offload=Offload.CPU), cluster, BATCH)
    assert hpz.total("gpu") == plain.total("gpu")
    secondary, shard = (zo_step.shard_elements(plain.architecture, ranks) * 2 for ranks in (8, 16))
    assert hpz.total("cpu") - plain.total("cpu") == 2 * secondary - shard


# --- advice --------------------------------------------------------------------------------------


def test_advice_names_hpz_on_two_nodes_when_it_fits(capsys, config_file):
    code, out, _ = run(capsys, "--model", "opt-66b", "--config", config_file(), "--nodes", "2", "--batch-size", "4")
    assert code == 0
    assert 'use ZeRO++ hpZ, `"zero_optimization": {"zero_hpz_partition_size": 8}`' in out
    assert "2 groups of 8 GPUs evaluate 2 directions per step" in out
    # Taken, the advice is gone and the report shows the replicas and the first forward's plain gather.
    code, out, _ = run(capsys, "--model", "opt-66b", "--config", config_file(zero_hpz_partition_size=8),
                       "--nodes", "2", "--batch-size", "4")  # fmt: skip
    assert code == 0 and "To make it faster" not in out
    assert "replica-mode perturbation: 2 groups of 8 GPUs" in out and "from the primary shards, once" in out


def test_advice_does_not_name_hpz_on_one_node(capsys, config_file):
    code, out, _ = run(capsys, "--model", "opt-66b", "--config", config_file(), "--nodes", "1", "--batch-size", "4")
    assert code == 0 and "hpz" not in out.lower()
    code, out, _ = run(capsys, "--model", "opt-66b", "--config", config_file(zero_hpz_partition_size=8), "--nodes", "1")
    assert "set `zero_optimization.zero_hpz_partition_size` to 1" in out


def test_advice_says_why_hpz_does_not_fit(capsys, config_file):
    # OPT-175B in place: the shards fit on 2 nodes (48 GiB), but 1/8 of the model (41 GiB) and its backup do not.
    code, out, _ = run(capsys, "--model", "opt-175b", "--config", config_file(), "--nodes", "2", "--batch-size", "4")
    assert code == 0 and "use ZeRO++ hpZ" not in out
    (advice,) = [line for line in out.splitlines() if "ZeRO++ hpZ" in line]
    assert "But it does not fit" in advice and "more nodes do not shrink" in advice and "GPU:" in advice
    assert "With `subzero.fused` true (no backups) it fits." in advice
    fused = estimate("opt-175b", settings(hpz=8, fused=True), Cluster(2, 8), BATCH)
    assert fused.fits and not estimate("opt-175b", settings(hpz=8), Cluster(2, 8), BATCH).fits


# --- flags and errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("flag,value", [("--inter-node-gbps", "-5"), ("--intra-node-gbps", "0"),
                                        ("--tflops", "nan"), ("--inter-node-gbps", "inf")])
def test_bad_rates_name_the_flag_and_the_value(capsys, config_file, flag, value):
    code, _, err = run(capsys, "--model", "opt-13b", "--config", config_file(), flag, value)
    assert code == 2 and f"`{flag}` is {float(value)!r}" in err and "Traceback" not in err
    code, _, err = run(capsys, "--table", "time", flag, value)
    assert code == 2 and f"`{flag}` is {float(value)!r}" in err


@pytest.mark.parametrize("argv,message", [
    (["--hpz-partition-size", "-1"], "`--hpz-partition-size` is -1"),
    (["--hpz-partition-size", "3", "--nodes", "2"], "is 3, which does not divide the 16 ranks"),
    (["--hpz-partition-size", "4", "--gpus-per-node", "6", "--nodes", "2"], "some hpZ groups would straddle two nodes"),
])  # fmt: skip
def test_bad_hpz_group_sizes_are_refused(capsys, config_file, argv, message):
    code, _, err = run(capsys, "--model", "opt-13b", "--config", config_file(), *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_hpz_with_nvme_offload_is_refused():
    with pytest.raises(MemoryPlanError, match="zero_hpz_partition_size` is 8 with .*\"nvme\""):
        estimate("opt-13b", settings(hpz=8, offload=Offload.NVME), Cluster(2, 8))


def test_a_bad_hpz_value_in_the_config_names_the_key(capsys, config_file):
    code, _, err = run(capsys, "--model", "opt-13b", "--config", config_file(zero_hpz_partition_size="8"))
    assert code == 2 and "zero_hpz_partition_size" in err and "Traceback" not in err


def test_the_api_checks_the_rates_too():
    with pytest.raises(MemoryPlanError, match="`inter_node_gbps` is -1"):
        estimate("opt-13b", settings(), Cluster(2, 8, inter_node_gbps=-1))


# --- the table -----------------------------------------------------------------------------------


def test_time_table_has_every_model_nodes_and_mode(capsys):
    code, out, _ = run(capsys, "--table", "time")
    assert code == 0
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| opt-")]
    assert {(r[0][2:], int(r[2]), r[3]) for r in rows} == {
        (name, nodes, mode) for name in ("opt-13b", "opt-30b", "opt-66b", "opt-175b")
        for nodes in (1, 2, 4, 8, 16) for mode in ("plain", "hpZ")
    }  # fmt: skip
    assert len(rows) == 40
    for r in rows:
        across, step = float(r[6]), float(r[9])
        assert (across == 0) == (r[3] == "hpZ" or r[2] == "1")
        if r[3] == "hpZ" and r[2] != "1":  # its plain twin is the row above
            plain = rows[rows.index(r) - 1]
            assert step < float(plain[9]) and float(r[4].rstrip(" ✗")) > float(plain[4].rstrip(" ✗"))


def test_the_memory_table_is_still_the_default(capsys):
    code, out, _ = run(capsys, "--table")
    assert code == 0 and "| ZO in-place | ZO fused |" in out
    assert run(capsys, "--table", "memory")[1] == out


def test_advice_does_not_name_hpz_for_a_method_it_cannot_serve(capsys, tmp_path):
    path = tmp_path / "hizoo.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3},
                                "subzero": {"method": "hizoo"}}))
    code, out, _ = run(capsys, "--model", "opt-66b", "--config", str(path), "--nodes", "2", "--batch-size", "4")
    assert code == 0 and "use ZeRO++ hpZ" not in out
    assert "ZeRO++ hpZ would keep the gathers inside each node, but `subzero.method` is 'hizoo'" in out


def test_hpz_keeps_the_update_rules_state_for_the_secondary_range_too():
    cluster = Cluster(2, 8)
    adam = SubZeroConfig.from_section({"method": "mezo", "update": "adam"})
    extra = {name: estimate("opt-66b", settings(hpz=8, **subzero), cluster, BATCH).total("gpu")
             - estimate("opt-66b", settings(hpz=1, **subzero), cluster, BATCH).total("gpu")
             for name, subzero in (("adam", {"subzero": adam}), ("sgd", {}))}
    secondary = zo_step.shard_elements(memory.load_architecture("opt-66b"), 8)
    assert extra["adam"] - extra["sgd"] == pytest.approx(secondary * 8)  # Adam's m and v (fp32) over the 1/8 range
