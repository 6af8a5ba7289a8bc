"""The memory planner: DeepSpeed agreement, fused/offload accounting, advice, and user errors."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import subprocess
import sys

import pytest

from subzero_ds import memory
from subzero_ds.config import ConfigError
from subzero_ds.memory import (
    BatchShape,
    Cluster,
    MemoryPlanError,
    Offload,
    ZeroSettings,
    estimate,
)
from subzero_ds.memory import zo_step
from subzero_ds.methods import registry

GiB = memory.GiB


def ds_config(**subzero) -> dict:
    return {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}, "subzero": {"method": "subzero", **subzero}}


def item(result: memory.Estimate, prefix: str) -> memory.Item:
    (found,) = [i for i in result.items if i.name.startswith(prefix)]
    return found


# --- DeepSpeed agreement -----------------------------------------------------------------------


@pytest.mark.parametrize("offload", [Offload.NONE, Offload.CPU])
@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (4, 8), (8, 8)])
def test_model_states_agree_with_deepspeed(offload, nodes, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    arch = memory.BUILTIN_MODELS["opt-66b"]
    ours = memory.deepspeed_model_states(arch.total_params, arch.largest_layer_params, gpus, nodes, offload)
    theirs = estimate_zero3_model_states_mem_needs(
        arch.total_params, arch.largest_layer_params, num_gpus_per_node=gpus, num_nodes=nodes,
        cpu_offload=offload is Offload.CPU, cpu_offload_params=offload is Offload.CPU, zero_init=True,
    )  # fmt: skip
    assert ours == theirs[:2]
    result = estimate(arch, ZeroSettings(offload=offload), Cluster(nodes, gpus), BatchShape(1, 128))
    states = result.first_order[0]
    assert states.gpu == theirs[1]
    assert states.cpu * gpus == pytest.approx(theirs[0])  # ours per rank, DeepSpeed's per node


def _printed(fn, *args, **kwargs) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args, **kwargs)
    return out.getvalue()


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_parameter_counts_match_deepspeed_all_live(family, tmp_path):
    """Our counts from config.json == DeepSpeed's from the built model (all_live == all_cold printout)."""
    import torch
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs_all_cold,
        estimate_zero3_model_states_mem_needs_all_live,
        model_to_params,
    )  # fmt: skip
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    if family == "opt":
        config = OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=32)  # fmt: skip
    else:
        config = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, intermediate_size=80,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    config.save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    arch = memory.load_architecture(tmp_path)
    assert (arch.total_params, arch.largest_layer_params) == model_to_params(model)
    live = _printed(estimate_zero3_model_states_mem_needs_all_live, model, num_gpus_per_node=8, num_nodes=2)
    cold = _printed(estimate_zero3_model_states_mem_needs_all_cold, arch.total_params, arch.largest_layer_params,
                    num_gpus_per_node=8, num_nodes=2)  # fmt: skip
    assert live == cold


def test_builtin_parameter_counts():
    counts = {name: arch.total_params / 1e9 for name, arch in memory.BUILTIN_MODELS.items()}
    assert counts["opt-125m"] == pytest.approx(0.1252, abs=1e-3)
    assert counts["opt-13b"] == pytest.approx(12.85, abs=0.01)
    assert counts["opt-175b"] == pytest.approx(174.6, abs=0.3)
    assert counts["llama-2-7b"] == pytest.approx(6.738, abs=0.01)
    assert counts["llama-2-70b"] == pytest.approx(68.98, abs=0.02)


def test_chunk_constants_match_the_fused_pass_and_the_loss():
    from subzero_ds import fused, loss

    assert zo_step.LOSS_CHUNK_ELEMENTS == loss.CHUNK_ELEMENTS
    assert zo_step.SIDE_PATH_UPCAST_ELEMENTS == fused.side_paths.UPCAST_CHUNK_ELEMENTS


# --- accounting ---------------------------------------------------------------------------------


def test_fused_doubles_activations_and_drops_the_backup():
    batch, cluster = BatchShape(16, 2048), Cluster(1, 8)
    for bf16 in (False, True):
        config = lambda fused: {**ds_config(fused=fused), "bf16": {"enabled": bf16}}
        in_place = estimate("opt-13b", config(False), cluster, batch)
        fused = estimate("opt-13b", config(True), cluster, batch)
        assert in_place.peak_moment == fused.peak_moment
        # The doubled batch, plus the side path's x·V (tokens × r) and, in bf16, one fp32 input chunk.
        ratio = item(fused, "forward activations").gpu / item(in_place, "forward activations").gpu
        assert 2.0 < ratio < 2.05
        assert item(in_place, "in-place backup").gpu == pytest.approx(item(in_place, "parameter shards").gpu, rel=1e-2)
        assert not [i for i in fused.items if i.name.startswith("in-place backup")]


def test_the_chunked_loss_keeps_only_the_logits_at_the_lm_head():
    # A wide vocabulary and a short model: the LM head and loss are the peak.
    batch, cluster = BatchShape(16, 2048), Cluster(1, 8)
    in_place = estimate("opt-125m", ds_config(fused=False), cluster, batch)
    assert in_place.peak_moment == "the LM head and loss"
    logits = 16 * 2048 * 50272 * 2
    assert logits < item(in_place, "forward activations").gpu < logits * 1.1


def test_offload_moves_shards_off_the_gpu():
    cluster, batch = Cluster(2, 8), BatchShape(1, 512)
    none = estimate("llama-2-70b", ds_config(), cluster, batch)
    cpu = estimate("llama-2-70b", {**ds_config(), "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
                   cluster, batch)  # fmt: skip
    nvme = estimate("llama-2-70b", ZeroSettings(offload=Offload.NVME), cluster, batch)
    shards = item(none, "parameter shards").gpu
    assert shards > 4 * GiB
    assert none.total("gpu") - cpu.total("gpu") >= 2 * shards - 1  # shards and their backup leave the GPU
    assert cpu.total("cpu") - none.total("cpu") >= 2 * shards - 1
    assert item(nvme, "parameter shards").nvme == shards and nvme.total("gpu") < none.total("gpu")


def test_cpu_device_folds_gpu_bytes_into_host_ram():
    cuda = estimate("opt-125m", ds_config(), Cluster(1, 2), BatchShape(8, 128))
    cpu = estimate("opt-125m", ds_config(), Cluster(1, 2), BatchShape(8, 128), device="cpu")
    assert cpu.total("gpu") == 0
    runtime = lambda e: sum(i.gpu + i.cpu for i in e.items if i.name.startswith("runtime"))
    assert cpu.host_total - runtime(cpu) == pytest.approx(cuda.host_total - runtime(cuda))


def test_does_not_fit_gives_advice_that_fits():
    result = estimate("opt-175b", ds_config(), Cluster(1, 8, gpu_memory_gib=80), BatchShape(4, 512))
    assert not result.fits and result.problems and "GPU" in result.problems[0]
    assert result.advice
    assert any("nodes" in a for a in result.advice)
    assert any("offload_param" in a for a in result.advice)
    nodes = int(next(a for a in result.advice if "nodes" in a).split()[1])
    assert estimate("opt-175b", ds_config(), Cluster(nodes, 8), BatchShape(4, 512)).fits


def test_first_order_needs_far_more_than_zo():
    result = estimate("opt-13b", ds_config(), Cluster(1, 8), BatchShape(4, 512))
    assert result.total("gpu", first_order=True) > 3 * result.total("gpu")


def test_prediction_table_lists_every_model():
    table = memory.prediction_table()
    for name in memory.TABLE_MODELS:
        assert f"| {name} |" in table
    assert table.count("\n| ") == len(memory.TABLE_MODELS) * len(memory.TABLE_NODES) * 2 + 1


# --- user errors --------------------------------------------------------------------------------


def test_unknown_model_names_value_and_valid_names():
    with pytest.raises(MemoryPlanError) as error:
        estimate("opt-7b", ds_config())
    assert "'opt-7b'" in str(error.value) and "opt-13b" in str(error.value) and "llama-2-70b" in str(error.value)


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(MemoryPlanError, match="nope.json"):
        estimate("opt-13b", str(tmp_path / "nope.json"))


def test_bad_numbers_name_the_key():
    with pytest.raises(MemoryPlanError, match="`nodes` is 0"):
        estimate("opt-13b", ds_config(), Cluster(nodes=0))
    with pytest.raises(MemoryPlanError, match="`seq_len` is -5"):
        estimate("opt-13b", ds_config(), batch=BatchShape(1, -5))
    with pytest.raises(ConfigError, match="stage3_prefetch_bucket_size"):
        estimate("opt-13b", {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "big"}})
    with pytest.raises(MemoryPlanError, match="zero_optimization.stage"):
        estimate("opt-13b", {"zero_optimization": {"stage": 0}})
    with pytest.raises(ConfigError, match="subzero.rnk"):
        estimate("opt-13b", ds_config(rnk=8))


def test_model_type_not_modelled(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(MemoryPlanError, match="'gpt2'"):
        memory.load_architecture(tmp_path)


def test_cli_bad_input_exits_nonzero_without_traceback(capsys, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(ds_config()))
    assert memory.main(["--model", "opt-7b", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "opt-7b" in err and "Traceback" not in err
    assert memory.main(["--model", "opt-13b", "--config", str(tmp_path / "missing.json")]) == 2
    assert memory.main(["--model", "opt-175b", "--config", str(config), "--batch-size", "4"]) == 1  # does not fit
    assert "To make it fit" in capsys.readouterr().out
    assert memory.main(["--model", "opt-13b", "--config", str(config), "--nodes", "2"]) == 0


def test_console_entry_point_runs():
    completed = subprocess.run([sys.executable, "-m", "subzero_ds.memory", "--model", "gpt-9"], check=False,
                               capture_output=True, text=True)  # fmt: skip
    assert completed.returncode == 2 and "Traceback" not in completed.stderr and "--config" in completed.stderr


def test_eager_attention_counts_the_score_matrices():
    batch = BatchShape(8, 4096)
    sdpa = estimate("llama-2-7b", ZeroSettings(), Cluster(1, 8), batch)
    eager = estimate("llama-2-7b", ZeroSettings(), Cluster(1, 8), batch, attention="eager")
    scores = 2 * batch.batch_size * 32 * batch.seq_len**2 * 2  # scores + probabilities, bf16
    assert eager.peak_moment == "a decoder layer"
    assert item(eager, "forward activations").gpu >= scores > item(sdpa, "forward activations").gpu


def test_cli_table_rejects_a_zero_batch(capsys):
    assert memory.main(["--table", "--batch-size", "0"]) == 2
    assert "`--batch-size` is 0" in capsys.readouterr().err


def test_a_hub_id_is_read_from_the_hugging_face_cache(tmp_path, monkeypatch):
    import huggingface_hub
    from transformers import OPTConfig

    # The cache layout huggingface_hub reads offline: models--org--name/{refs/main, snapshots/<rev>/}.
    snapshot = tmp_path / "hub" / "models--acme--opt-tiny" / "snapshots" / "0123abcd"
    OPTConfig(hidden_size=256, num_hidden_layers=3, ffn_dim=1024, num_attention_heads=4, vocab_size=1000,
              word_embed_proj_dim=256).save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at each call
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    arch = memory.load_architecture("acme/opt-tiny")
    assert (arch.hidden, arch.layers, arch.ffn, arch.vocab) == (256, 3, 1024, 1000)
    with pytest.raises(MemoryPlanError, match="'acme/not-cached'.*hf download"):
        memory.load_architecture("acme/not-cached")


@pytest.mark.parametrize("section,per_element", [({"method": "mezo", "update": "momentum"}, 4),
                                                  ({"method": "mezo", "update": "adam"}, 8), ({"method": "hizoo"}, 4)])
def test_method_state_is_sharded_like_the_parameters(section, per_element):
    cluster = memory.Cluster(nodes=1, gpus_per_node=8)
    result = memory.estimate("opt-13b", {"zero_optimization": {"stage": 3}, "subzero": section}, cluster)
    (state,) = [i for i in result.items if i.name.startswith("method state")]
    shard_elements = zo_step.shard_elements(result.architecture, cluster.world)
    # Adam's ĝ and step, HiZOO's z and √H·z: two fp32 chunks of 2**22 elements (methods/adam.py, methods/hizoo.py).
    chunks = 2 * (1 << 22) * 4 if section.get("update") == "adam" or section["method"] == "hizoo" else 0
    assert state.gpu == shard_elements * per_element + chunks


def test_subzero_keeps_its_momentum_and_adam_state_in_subspace_coordinates():
    cluster = memory.Cluster(nodes=1, gpus_per_node=8)
    sgd = memory.estimate("opt-13b", {"zero_optimization": {"stage": 3}, "subzero": {}}, cluster)
    adam = memory.estimate("opt-13b", {"zero_optimization": {"stage": 3}, "subzero": {"update": "adam"}}, cluster)
    assert not [i for i in sgd.items if i.name.startswith("method state")]
    (state,) = [i for i in adam.items if i.name.startswith("method state")]
    assert state.gpu < 0.01 * zo_step.shard_elements(adam.architecture, 8) * 8  # r×r, not m×n


@pytest.fixture
def stateful_mezo():
    """MeZO registered under another name with 4 bytes of state per trainable element; unregistered afterwards."""
    spec = registry.register_method(
        dataclasses.replace(registry.method("mezo"), name="test_stateful_mezo", title="", state_bytes_per_element=4)
    )
    yield spec
    del registry._METHODS[spec.name]


def test_the_planner_reads_the_method_state_from_the_registry(stateful_mezo):
    cluster = Cluster(nodes=1, gpus_per_node=8)
    config = lambda method: {"zero_optimization": {"stage": 3}, "subzero": {"method": method, "update": "momentum"}}
    mezo = estimate("opt-13b", config("mezo"), cluster)
    stateful = estimate("opt-13b", config(stateful_mezo.name), cluster)
    added = 4 * zo_step.shard_elements(mezo.architecture, cluster.world)  # 4 bytes × this rank's trainable elements
    assert item(stateful, "method state").gpu - item(mezo, "method state").gpu == added
    assert stateful.total("gpu") - mezo.total("gpu") == added
    assert item(stateful, "method state").name.startswith("method state: test_stateful_mezo's state + momentum")
