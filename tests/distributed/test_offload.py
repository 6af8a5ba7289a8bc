"""Parameter offload (``offload_param`` to "cpu" and to "nvme") follows the same trajectory as none.

Three 2-rank launches of tests/distributed/launching/trajectory.py (no offload, cpu, nvme), each running
SubZero and MeZO on OPT and LLaMA with persistent parameters (threshold 1e5) and SubZero on a
fully partitioned LLaMA (threshold 0). DeepSpeed swaps a partition to NVMe only from 1 MiB up,
so the models here get a vocabulary of 8192: each rank's half of an 8192×64 embedding (and of
LLaMA's untied lm_head) is exactly 1 MiB in fp32 and goes to NVMe, the rest stays in memory.
An edit of a swapped shard that is not written back is silently lost: the NVMe trajectory would
then leave those matrices where they started and drift from the in-memory one.

Run as a script, this file is trajectory.py with that vocabulary.
"""

import functools
import json
import sys

import pytest
import torch

from launch import run

pytestmark = pytest.mark.distributed
VOCAB = 8192  # 8192 × 64 fp32 over 2 ranks = 1 MiB partitions: the smallest DeepSpeed swaps to NVMe
CASES = ["opt-zero3-subzero", "llama-zero3-mezo", "llama-zero3-subzero-partitioned"]
SWAPPED = ["model.decoder.embed_tokens.weight", "model.embed_tokens.weight", "lm_head.weight"]
STEPS = 10  # past SubZero's subspace refresh at step 7; four launches of three models each


def trajectories(tmp_path, name: str, offload: dict | None, fused: bool = False) -> dict:
    out = tmp_path / f"{name}.pt"
    extra = ["--zero", json.dumps({"offload_param": offload})] if offload else []
    extra += ["--subzero", json.dumps({"fused": True})] if fused else []
    finished = run("ranks", 2, __file__, "--out", str(out), "--cases", *CASES, "--steps", str(STEPS), *extra)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return torch.load(out)["results"]


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory):
    return trajectories(tmp_path_factory.mktemp("none"), "none", None)


def max_difference(reference: dict, other: dict) -> tuple[float, str]:
    assert reference["state"].keys() == other["state"].keys()
    differences = {name: (other["state"][name] - t).abs().max().item() for name, t in reference["state"].items()}
    worst = max(differences, key=differences.get)
    return differences[worst], worst


def assert_same_trajectories(reference: dict, other: dict, label: str, tolerance: float = 1e-6) -> None:
    for case in CASES:
        assert len(other[case]["losses"]) == STEPS
        torch.testing.assert_close(torch.tensor(other[case]["losses"]), torch.tensor(reference[case]["losses"]),
                                   rtol=max(tolerance, 1e-6), atol=1e-6)
        difference, worst = max_difference(reference[case], other[case])
        print(f"{label} {case}: max abs parameter difference {difference:.2e} ({worst})")
        assert difference <= tolerance, f"{label} {case}: {worst} differs by {difference}"


def test_cpu_offload_follows_the_in_memory_trajectory(in_memory, tmp_path):
    assert_same_trajectories(in_memory, trajectories(tmp_path, "cpu", {"device": "cpu"}), "cpu")


def test_nvme_offload_follows_the_in_memory_trajectory(in_memory, tmp_path):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    AsyncIOBuilder().load(verbose=False)  # JIT-build async_io here (minutes on a fresh machine), not in the timed launch
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    offloaded = trajectories(tmp_path, "nvme", {"device": "nvme", "nvme_path": str(nvme)})
    # The fused pass (the mode for models bigger than memory: no backup, only the update writes) too;
    # fused and in-place differ by the side path's rounding only.
    fused = trajectories(tmp_path, "nvme-fused", {"device": "nvme", "nvme_path": str(tmp_path)}, fused=True)
    assert_same_trajectories(in_memory, fused, "nvme fused", tolerance=1e-5)
    # The embeddings really lived on NVMe, in fp32: one swap file per swapped partition.
    swap_files = list((nvme / "zero_stage_3" / "float32params").glob("rank*/*.swp"))
    assert len(swap_files) >= 2 * 2, sorted(str(f) for f in nvme.rglob("*"))
    assert_same_trajectories(in_memory, offloaded, "nvme")
    # Edits of swapped shards were written back: the swapped matrices moved, not only the rest.
    from helpers.tiny import tiny_model

    for case in CASES:
        arch = case.split("-")[0]
        initial = tiny_model(arch, vocab=VOCAB).state_dict()
        trained = offloaded[case]["state"]
        moved = [name for name in SWAPPED if name in trained and (trained[name] - initial[name]).abs().max() > 1e-4]
        assert moved, f"{case}: no NVMe-swapped matrix moved in {STEPS} steps"


def main() -> None:
    """trajectory.py with the tiny models' vocabulary raised to :data:`VOCAB`."""
    import trajectory
    from helpers.tiny import tiny_model

    trajectory.tiny_model = functools.partial(tiny_model, vocab=VOCAB)
    trajectory.main()


if __name__ == "__main__":
    sys.exit(main())
