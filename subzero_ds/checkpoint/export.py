"""Write full Hugging Face weights from a (possibly ZeRO-3 partitioned) model.

DeepSpeed's ``save_16bit_model`` needs an optimizer, so we gather module by module and stream
the tensors into safetensors files of bounded size on rank 0. The directory is written under a
temporary name and renamed into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import deepspeed
import torch
from safetensors.torch import save_file
from torch import nn

from ..distributed import barrier, is_main_process

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def iter_full_state(model: nn.Module, to_host: bool = True) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, full CPU tensor) for every parameter and persistent buffer, gathering one module at a time.

    Must be called on every rank (gathering is collective). Only ranks with ``to_host`` copy the
    tensors to the host (the others get None): on GPUs, a host copy of every gathered layer on
    every rank would be wasted PCIe traffic and host memory when one rank writes.
    """
    for module_name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False, remove_duplicate=False))
        prefix = f"{module_name}." if module_name else ""
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            for name, param in params:
                yield prefix + name, param.data.detach().to("cpu", copy=True) if to_host else None
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield prefix + name, buffer.detach().to("cpu", copy=True) if to_host else None


def save_hf_weights(model: nn.Module, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Save ``model`` (a ``transformers.PreTrainedModel``) so ``from_pretrained(path)`` loads it.

    Collective: call on every rank; only rank 0 writes. Tied weights are written once
    (``from_pretrained`` re-ties them from the config).
    """
    path = Path(path)
    staging = path.with_name(f".{path.name}.partial")
    writer = is_main_process()
    if writer:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    files: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    seen: set[int] = set()
    for name, tensor in iter_full_state(model, to_host=writer):
        if not writer or _tied_duplicate(model, name, seen):
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            _flush(files, staging)
            files.append({})
            sizes.append(0)
        files[-1][name] = tensor
        sizes[-1] += nbytes
    if writer:
        _flush(files, staging)
        _write_index(files, staging, sum(sizes))
        config = getattr(model, "config", None)
        if config is not None:
            config.save_pretrained(staging)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(staging)
        _replace_dir(staging, path)
    barrier()


def _tied_duplicate(model: nn.Module, name: str, seen: set[int]) -> bool:
    """True if ``name`` is a second name of a parameter already written (e.g. lm_head ↔ embeddings)."""
    try:
        param = model.get_parameter(name)
    except AttributeError:
        return False  # a buffer
    if id(param) in seen:
        return True
    seen.add(id(param))
    return False


def _file_name(index: int, count: int) -> str:
    return WEIGHTS_NAME if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _flush(files: list[dict[str, torch.Tensor]], staging: Path) -> None:
    """Write the newest file under a provisional name (its final name needs the total count)."""
    index = len(files) - 1
    save_file({k: v.contiguous() for k, v in files[index].items()}, staging / f"part-{index}", metadata={"format": "pt"})
    files[index] = {k: torch.empty(0) for k in files[index]}  # keep the names, drop the data


def _write_index(files: list[dict[str, torch.Tensor]], staging: Path, total_bytes: int) -> None:
    count = len(files)
    weight_map = {}
    for index, names in enumerate(files):
        final = _file_name(index, count)
        os.replace(staging / f"part-{index}", staging / final)
        weight_map.update({name: final for name in names})
    if count > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=2))


def _replace_dir(staging: Path, path: Path) -> None:
    for f in staging.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)
