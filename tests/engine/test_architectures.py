"""Any AutoModelForCausalLM, no special code: the fused ± pass on GPT-2 (Conv1D layers, a position
embedding shared by the batch), Mistral and Qwen2 follows the in-place trajectory; --model_type
overrides the causal/masked detection."""

import logging

import pytest
import torch
from transformers import LlamaConfig, RobertaConfig

import subzero_ds
from helpers.configs import zo_section
from helpers.tiny import pattern_batch, tiny_model
from subzero_ds.checkpoint.export import iter_full_state
from subzero_ds.train import is_masked_lm, parse_args


# As tests/fused/test_fused.py: lr 1e-4 keeps fp32 rounding of ℓ± (|Δg| ~ 5e-4) at ~1e-8 of the weights per step,
# while a wrong direction moves them by lr·|g|·|d| ~ 1e-4, far above the 1e-5 bound.
def make_config(fused: bool, method: str = "subzero") -> dict:
    return {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "subzero": zo_section(**{"method": method, "lr": 1e-4, "eps": 1e-3, "rank": 4, "subspace_interval": 5, "seed": 2,
                        "fused": fused})}


def run(arch: str, fused: bool, method: str = "subzero", steps: int = 6):
    engine = subzero_ds.initialize(model=tiny_model(arch), config=make_config(fused, method))
    results = [engine.step(pattern_batch(4, seed=i)) for i in range(steps)]
    return results, dict(iter_full_state(engine.module))


@pytest.mark.parametrize("arch,method", [("gpt2", "subzero"), ("gpt2", "mezo"), ("mistral", "subzero"),
                                         ("qwen2", "subzero")])
def test_fused_follows_the_in_place_trajectory(arch, method):
    (ref_results, ref_state), (results, state) = run(arch, False, method), run(arch, True, method)
    assert results[0].loss_pos != results[0].loss_neg  # the perturbation reached the forward
    torch.testing.assert_close(torch.tensor([(r.loss_pos, r.loss_neg) for r in results]),
                               torch.tensor([(r.loss_pos, r.loss_neg) for r in ref_results]), rtol=1e-5, atol=1e-6)
    initial = tiny_model(arch).state_dict()
    assert max((ref_state[k] - initial[k]).abs().max().item() for k in initial) > 1e-5  # the weights moved
    worst = max((state[k] - ref_state[k]).abs().max().item() for k in ref_state)
    assert worst <= 1e-5


def test_gpt2_conv1d_layers_take_the_side_path(caplog):
    from transformers.pytorch_utils import Conv1D

    model = tiny_model("gpt2")
    conv_params = sum(len(m._parameters) for m in model.modules() if type(m) is Conv1D)
    with caplog.at_level(logging.INFO, logger="subzero_ds"):
        subzero_ds.initialize(model=model, config=make_config(True))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fused ± pass")]
    # every Conv1D weight and bias (16), wte, wpe and the LM head tied to wte; only the LayerNorms materialized
    assert conv_params == 16 and line.startswith("fused ± pass: 19 parameter uses served by a side path")
    assert "Conv1D" not in line and "Embedding" not in line and "LayerNorm" in line


@pytest.fixture(scope="module")
def model_configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32).save_pretrained(root / "roberta")
    LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32).save_pretrained(root / "llama")
    return root


@pytest.mark.parametrize("model,flag,masked", [
    ("roberta", "auto", True), ("llama", "auto", False),  # detected from the config
    ("roberta", "causal", False), ("llama", "masked", True),  # the flag wins over the detection
])
def test_model_type_overrides_the_detection(model_configs, model, flag, masked):
    args = parse_args(["--model_type", flag, "--model_name_or_path", str(model_configs / model)])
    assert is_masked_lm(args.model.model_name_or_path, args.model.model_type) is masked
