"""The ZO step on NVIDIA GPUs: placement, bits, equivalences, NCCL. Skipped without CUDA.

``scripts/gpu_check.sh`` runs this file on a GPU machine. Each test names the claim it checks;
on a CPU-only machine the placement is checked with fake tensors instead
(``tests/engine/test_placement.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.configs import zo_section

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA (scripts/gpu_check.sh)"),
]

REPO = Path(__file__).resolve().parents[2]


def make_config(fused: bool = False, method: str = "subzero", lr: float = 1e-4, bf16: bool = False,
                persistence: int = 0, offload: str | None = None) -> dict:
    zero = {"stage": 3, "stage3_param_persistence_threshold": persistence}
    if offload:
        zero["offload_param"] = {"device": offload, "pin_memory": True}
    config = {"zero_optimization": zero,
              "subzero": zo_section(method, lr=lr, eps=1e-3, rank=4, subspace_interval=5, seed=2, fused=fused)}
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def run(config: dict, steps: int, arch: str = "llama"):
    import subzero_ds
    from helpers.tiny import pattern_batch, tiny_model
    from subzero_ds.checkpoint.export import iter_full_state

    engine = subzero_ds.initialize(model=tiny_model(arch), config=config)
    results = [engine.step(pattern_batch(4, seed=i)) for i in range(steps)]
    return engine, results, dict(iter_full_state(engine.module))


def max_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_directions_have_the_same_bits_on_the_host_and_the_gpu():
    from subzero_ds import kernels
    from subzero_ds.methods.subzero import SubspaceDirection

    key = (0x1234, 0x5678)
    assert torch.equal(kernels.gaussian(1 << 22, key, 12345, "cuda").cpu(), kernels.gaussian(1 << 22, key, 12345))
    src = torch.randn(1 << 20).to(torch.bfloat16)
    host = kernels.apply_(torch.empty_like(src), src, beta=0.99, alpha=1e-3, key=key, rounding_key=(7, 8))
    device = kernels.apply_(torch.empty_like(src, device="cuda"), src.cuda(), beta=0.99, alpha=1e-3, key=key,
                            rounding_key=(7, 8))
    assert torch.equal(device.cpu(), host)
    direction = SubspaceDirection(seed=1, rank=24, interval=10, reshape=False)
    torch.testing.assert_close(direction.full("w", (1000, 300), 3, "cuda").cpu(), direction.full("w", (1000, 300), 3),
                               rtol=1e-5, atol=1e-6)  # cuBLAS and MKL round the matmul differently


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_a_step_keeps_everything_on_the_gpu(fused, bf16):
    """Shards and backups on the GPU, and a whole step moves at most a few scalars between host and GPU."""
    from torch.profiler import ProfilerActivity, profile

    from helpers.tiny import pattern_batch

    engine, _, _ = run(make_config(fused=fused, bf16=bf16), steps=1)
    assert all(s.device.type == "cuda" for s in engine.shards)
    assert engine.probes.theta is None or all(b.device.type == "cuda" for b in engine.probes.theta.local.values())
    batch = {k: v.cuda() for k, v in pattern_batch(4, seed=9).items()}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step(batch)
        torch.cuda.synchronize()
    copies = [e for e in prof.events() if "Memcpy" in e.name and ("HtoD" in e.name or "DtoH" in e.name)]
    trainable_bytes = sum(s.local_numel * s.param.element_size() for s in engine.shards)
    copied = sum(getattr(e, "device_memory_usage", 0) or 0 for e in copies)
    assert len(copies) <= 16, [e.name for e in copies]  # the losses and g: a handful of scalars
    assert copied < 0.01 * trainable_bytes


def test_persistent_copies_stay_bit_identical_to_their_shards():
    engine, _, _ = run(make_config(persistence=10**9), steps=10)
    checked = 0
    for shard in engine.shards:
        gathered = shard.gathered()
        if gathered is not None:
            assert torch.equal(shard.local(), gathered.narrow(0, shard.start, shard.local_numel)), shard.name
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("fused", [False, True])
def test_lr_zero_leaves_bf16_weights_bit_identical(fused):
    import subzero_ds
    from helpers.tiny import tiny_model
    from subzero_ds.checkpoint.export import iter_full_state

    before = dict(iter_full_state(subzero_ds.initialize(model=tiny_model("llama"), config=make_config(bf16=True)).module))
    _, results, after = run(make_config(fused=fused, lr=0.0, bf16=True), steps=5)
    assert all(r.loss_pos != r.loss_neg for r in results)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", ["subzero", "mezo"])
def test_fused_follows_the_in_place_trajectory(method):
    _, _, in_place = run(make_config(fused=False, method=method), steps=20)
    _, _, fused = run(make_config(fused=True, method=method), steps=20)
    assert max_difference(in_place, fused) <= 1e-5


@pytest.mark.parametrize("fused", [False, True])
def test_cpu_offload_follows_the_same_trajectory(fused):
    _, _, on_gpu = run(make_config(fused=fused), steps=10)
    engine, _, offloaded = run(make_config(fused=fused, offload="cpu"), steps=10)
    assert all(s.device.type == "cpu" for s in engine.shards)  # the arithmetic ran on the host
    assert max_difference(on_gpu, offloaded) <= 1e-5


def _trajectory(launcher: list[str], out: Path, cases: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    script = str(REPO / "tests" / "distributed" / "launching" / "trajectory.py")
    done = subprocess.run([*launcher, script, "--out", str(out), "--cases", *cases], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)["results"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for a 2-rank NCCL run")
def test_one_and_two_gpus_follow_the_same_trajectory(tmp_path):
    from subzero_ds.distributed import free_port

    cases = ["llama-zero3-subzero", "opt-zero3-mezo"]
    one = _trajectory([sys.executable], tmp_path / "one.pt", cases)
    two = _trajectory([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                       str(free_port())], tmp_path / "two.pt", cases)
    for case in cases:
        assert max_difference(one[case]["state"], two[case]["state"]) <= 1e-5, case


TEXTS = ["a great and moving film", "a dull and boring mess", "the best movie this year", "the worst movie this year"]


@pytest.mark.parametrize("gpus", [1, 2])
def test_the_cli_trains_a_tiny_model_under_zero3(tmp_path, gpus):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    from helpers.tiny import save_tiny_pretrained
    from subzero_ds.distributed import free_port

    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2 == 0:d}\n"
                                                                    for i, t in enumerate(TEXTS * 4)))
    save_tiny_pretrained(tmp_path / "model", "llama", TEXTS * 5 + ["It was great terrible"] * 5)
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(gpus), "--master_port", str(free_port()),
               "--module", "subzero_ds.train", "--model_name_or_path", str(tmp_path / "model"), "--task", "sst2",
               "--train_file", str(tmp_path / "train.tsv"), "--validation_file", str(tmp_path / "train.tsv"),
               "--max_steps", "8", "--log_steps", "4", "--per_device_batch_size", "2", "--max_length", "32",
               "--output_dir", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [4, 8]
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
