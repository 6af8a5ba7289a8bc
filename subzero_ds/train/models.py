"""The model a run trains: its directory (the built-in SmolLM2 made once), its kind, its loading and saving."""

from __future__ import annotations

from pathlib import Path

import torch

from subzero_ds.adapters import is_peft_model, save_adapter
from subzero_ds.distributed import barrier, is_main_process

MASKED_LM_TYPES = {"roberta", "bert", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "camembert"}


def resolve_model_path(name: str) -> str:
    """A local directory for the named built-in model (made once, by rank 0), or ``name`` itself."""
    from . import pretrained

    if name != pretrained.SMOLLM2:
        return name
    if is_main_process():
        pretrained.materialize_smollm2()
    barrier()
    return str(pretrained.materialize_smollm2())


def is_masked_lm(path: str, model_type: str) -> bool:
    if model_type != "auto":
        return model_type == "masked"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if any(a.endswith("ForMaskedLM") for a in (config.architectures or [])):
        return True
    return config.model_type in MASKED_LM_TYPES and not getattr(config, "is_decoder", False)


def load_model(path: str, masked_lm: bool, dtype: torch.dtype):
    """``from_pretrained`` in ``dtype``; under ZeRO-3 (an ``HfDeepSpeedConfig`` alive) partitioned while it loads."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    model_class = AutoModelForMaskedLM if masked_lm else AutoModelForCausalLM
    return model_class.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")


def save_model(engine, path: Path) -> None:
    """Full Hugging Face weights, or just the adapter in PEFT's format."""
    if is_peft_model(engine.module):
        save_adapter(engine.module, path)
    else:
        engine.save_pretrained(path)
