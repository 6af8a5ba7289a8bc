"""Parameter-efficient tuning with the ``peft`` library's adapters: LoRA, prefix and prompt tuning.

The ZO engine trains whatever has ``requires_grad``, so after :func:`add_adapter` only the
adapter is perturbed and updated; the frozen base weights are never written (under ZeRO-3 they
stay in their partitions). With frozen parameters present, ``"reshape": "auto"`` turns on the
near-square reshape for the adapter matrices (an 8×5120 LoRA factor is perturbed as 160×256).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError
from .distributed import barrier, is_main_process
from .checkpoint.export import iter_full_state


class Tuning(str, Enum):
    """What the ZO optimizer trains."""

    FULL = "full"  # every parameter
    LORA = "lora"  # low-rank adapters on the target projections
    PREFIX = "prefix"  # trainable key/value prefixes in every layer
    PROMPT = "prompt"  # trainable virtual input tokens


@dataclass(frozen=True)
class AdapterOptions:
    """Adapter settings; the defaults are the published SubZero/MeZO ones.

    Attributes:
        lora_r, lora_alpha: LoRA rank and scaling (8, 16).
        lora_target_modules: module names LoRA wraps (q_proj and v_proj; OPT and LLaMA both use these).
        num_virtual_tokens: prefix length (default 5) or prompt length (default 10).
        seed: makes prompt tuning's initialization (embeddings of sampled vocabulary tokens)
            identical on every rank.
    """

    lora_r: int = 8
    lora_alpha: int = 16
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    num_virtual_tokens: int | None = None
    seed: int = 0


def add_adapter(
    model: nn.Module, tuning: Tuning, options: AdapterOptions = AdapterOptions(), masked_lm: bool = False
) -> nn.Module:
    """Wrap ``model`` in a ``peft`` adapter (or return it unchanged for full fine-tuning).

    Call it before :func:`subzero_ds.initialize`; under ZeRO-3 the base model may already be
    partitioned (loaded under ``HfDeepSpeedConfig``).

    Raises:
        ConfigError: a LoRA target module the model does not have, or prefix/prompt tuning of a masked LM.
    """
    tuning = Tuning(tuning)
    if tuning is Tuning.FULL:
        return model
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    if masked_lm and tuning is not Tuning.LORA:
        raise ConfigError(f"--tuning {tuning.value} is supported for causal LMs; use lora or full for masked LMs")
    task_type = None if masked_lm else TaskType.CAUSAL_LM
    if tuning is Tuning.LORA:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in options.lora_target_modules if t not in names]
        if missing:
            raise ConfigError(
                f"`--lora_target_modules` {missing} not found in the model; its linear layers include "
                f"{sorted(n for n in names if 'proj' in n or 'fc' in n)[:12]}. Pass names from that list."
            )
        config = LoraConfig(task_type=task_type, r=options.lora_r, lora_alpha=options.lora_alpha,
                            target_modules=list(options.lora_target_modules), lora_dropout=0.0)
    elif tuning is Tuning.PREFIX:
        config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=options.num_virtual_tokens or 5)
    else:
        config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=options.num_virtual_tokens or 10,
                                    prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    with torch.random.fork_rng(devices=[]):  # the host generator only: forking CUDA's would initialize every GPU
        torch.manual_seed(options.seed)  # the same sampled init on every rank
        return get_peft_model(model, config)


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel``."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Save the adapter in PEFT's format (``PeftModel.from_pretrained(base, path)`` loads it).

    Collective under ZeRO-3 (the trainable tensors are gathered); rank 0 writes.
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    writer = is_main_process()
    state = {name: tensor for name, tensor in iter_full_state(model, to_host=writer) if name in trainable}
    if writer:
        model.save_pretrained(path, state_dict=state)
    barrier()


def merge_adapter(base_model_path: str, adapter_path: str | os.PathLike, output: str | os.PathLike) -> None:
    """Write base + adapter merged into a plain model directory (rank 0, on CPU; loads the base whole)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if is_main_process():
        base = AutoModelForCausalLM.from_pretrained(base_model_path)
        merged = PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
        merged.save_pretrained(Path(output))
    barrier()
