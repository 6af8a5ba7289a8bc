"""The model a run trains: its directory (the built-in SmolLM2 made once), its kind, its loading and saving."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from subzero_ds.adapters import is_peft_model, save_adapter
from subzero_ds.checkpoint.export import save_hf_weights
from subzero_ds.config import deepspeed_section
from subzero_ds.distributed import barrier, is_main_process

from . import pretrained
from .flags import UsageError

MASKED_LM_TYPES = {"roberta", "bert", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "camembert"}
# Model types whose learned position table ends at max_position_embeddings (minus RoBERTa's padding offset).
_LEARNED_POSITIONS = {"opt": 0, "gpt2": 0, "bert": 0, "distilbert": 0, "electra": 0, "roberta": 2, "xlm-roberta": 2,
                      "camembert": 2}


def resolve_model_path(name: str) -> str:
    """A local directory for the named built-in model (made once, by rank 0), or ``name`` itself."""
    if name != pretrained.SMOLLM2:
        return name
    if is_main_process():
        pretrained.materialize_smollm2()
    barrier()
    return str(pretrained.materialize_smollm2())


def is_masked_lm(path: str, model_type: str) -> bool:
    """Whether the model at ``path`` is a masked LM; ``model_type`` "auto" reads its config, else it says."""
    if model_type != "auto":
        return model_type == "masked"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if any(a.endswith("ForMaskedLM") for a in (config.architectures or [])):
        return True
    return config.model_type in MASKED_LM_TYPES and not getattr(config, "is_decoder", False)


def load_model(path: str, masked_lm: bool, dtype: torch.dtype) -> nn.Module:
    """``from_pretrained`` in ``dtype``; under ZeRO-3 (an ``HfDeepSpeedConfig`` alive) partitioned while it loads."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    model_class = AutoModelForMaskedLM if masked_lm else AutoModelForCausalLM
    return model_class.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")


def save_model(module: nn.Module, path: Path) -> None:
    """Full Hugging Face weights (gathered; rank 0 writes), or just the adapter in PEFT's format. Call on every rank."""
    if is_peft_model(module):
        save_adapter(module, path)
    else:
        save_hf_weights(module, path)


def saved_model_bytes(module: nn.Module, merged: bool = False) -> int:
    """Bytes :func:`save_model` writes (full weights, or a PEFT model's adapter; ``merged``: plus the merged model)."""
    def size(p: nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel())) * p.dtype.itemsize  # the full size under ZeRO-3

    everything = sum(size(p) for p in module.parameters())
    if not is_peft_model(module):
        return everything
    adapter = sum(size(p) for p in module.parameters() if p.requires_grad)
    return adapter + (everything - adapter if merged else 0)


def check_model_directory(flag: str, name: str, needs_config: bool) -> dict[str, Any] | None:
    """A local model/tokenizer directory must exist (a hub id is left to ``from_pretrained``); its config.json.

    Raises:
        UsageError: ``name`` looks local but does not exist, is a file, or lacks a readable config.json.
    """
    if name == pretrained.SMOLLM2:
        return None
    path = Path(name).expanduser()
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if not path.exists():
        if looks_local:
            raise UsageError(f"{flag} {name} does not exist: pass a local model directory (written by "
                             "save_pretrained) or a Hugging Face hub id such as facebook/opt-125m")
        return None
    if not path.is_dir():
        raise UsageError(f"{flag} {name} is a file: pass the directory that holds it (written by save_pretrained)")
    config_file = path / "config.json"
    if not needs_config:
        return None
    if not config_file.is_file():
        raise UsageError(f"{flag} {name} has no config.json, so it is not a Hugging Face model directory: pass "
                         "the directory written by save_pretrained")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{config_file} is not a readable JSON file ({error}): restore the model's "
                         "config.json") from None
    if not isinstance(config, dict):
        raise UsageError(f"{config_file} must hold a JSON object: restore the model's config.json")
    return config


def check_position_limit(config: dict[str, Any] | None, max_length: int, model: str) -> None:
    """--max_length must fit a learned position table (a longer sequence fails deep inside the model)."""
    if config is None or config.get("model_type") not in _LEARNED_POSITIONS:
        return
    positions = config.get("max_position_embeddings", config.get("n_positions"))
    if not isinstance(positions, int):
        return
    limit = positions - _LEARNED_POSITIONS[config["model_type"]]
    if max_length > limit:
        raise UsageError(f"--max_length {max_length} is longer than the {limit} positions {model} "
                         f"({config['model_type']}) has: pass --max_length {limit} or less")


@contextlib.contextmanager
def partitioned_loading(ds_config: Mapping[str, Any], stage: int, per_device_batch_size: int | None) -> Iterator[None]:
    """Within (ZeRO-3 only): transformers and peft partition the weights as they load, and gather the
    partitioned weights they read (prompt tuning's init). Leave it once the engine is built, so that
    rank-0-only work later (merging the adapter on CPU) does not start collectives.
    """
    if stage != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    section = deepspeed_section(ds_config)
    if "train_batch_size" not in section:  # DeepSpeed's config parser insists on a batch size
        section.setdefault("train_micro_batch_size_per_gpu", per_device_batch_size or 1)
    hf_zero3 = HfDeepSpeedConfig(section)  # transformers holds it weakly: alive as long as this reference
    try:
        yield
    finally:
        del hf_zero3
