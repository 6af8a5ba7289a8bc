"""Sharded checkpoints that resume a ZO run exactly, on the same or a different world size.

DeepSpeed's ``save_checkpoint`` needs an optimizer (without one it fails on rank 0 and the other
ranks hang), so checkpoints are ours. Directions are regenerated from (run seed, step), so
besides the weights a checkpoint holds only the method's own state (momentum, Adam moments,
HiZOO's Hessian: sharded like the parameters, or SubZero's r×r coordinates whole on every rank)
and its few scalars:

    checkpoint-<step>/
        rank-00000-of-00002.safetensors   this rank's flat range [start, end) of every trainable
        rank-00001-of-00002.safetensors   parameter, in the parameter's dtype (bit-exact), and of
                                          each method state tensor
        manifest.json                     step, seed, settings, the method's scalars, data position,
                                          world size, per-file ranges and SHA-256 (written last)

Atomicity: everything is written into ``.checkpoint-<step>.partial/``, each file fsynced, the
manifest written last, then the directory is renamed into place (and the parent fsynced). A crash
at any point leaves the previous checkpoints intact; partial directories are ignored and swept
by the next save. Resuming on another world size re-cuts the shards from full-shape positions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..distributed import all_gather_objects, barrier, get_world_size_and_rank, is_main_process
from ..methods.base import StateTensor
from ..zero.shards import ParamShard

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: missing, incomplete, corrupt, or from another run."""


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` holds.

    Attributes:
        step: steps completed; the resumed run's next step.
        world_size: ranks that wrote the shard files.
        state: engine state (run seed, settings fingerprint, skip counter, lr …).
        extra: the caller's state (data position, model path, tuning …).
        files: file name -> {"sha256": …, "ranges": {parameter: [start, end]}}.
        shapes: parameter -> full shape.
        dtypes: parameter -> dtype name.
    """

    step: int
    world_size: int
    state: dict[str, Any]
    extra: dict[str, Any]
    files: dict[str, dict[str, Any]]
    shapes: dict[str, list[int]]
    dtypes: dict[str, str]


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under ``root``."""
    return Path(root) / f"checkpoint-{step}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root`` (a manifest present), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / MANIFEST).is_file()]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_sharded(root: str | os.PathLike, step: int, shards: list[ParamShard], state: dict[str, Any],
                 extra: dict[str, Any], keep_last: int | None = None,
                 method_state: list[StateTensor] | None = None) -> Path:
    """Write ``checkpoint-<step>`` under ``root`` atomically. Collective: call on every rank.

    Args:
        root: the directory holding checkpoints (shared by all ranks).
        step: steps completed.
        shards: this rank's trainable shards.
        state: the engine's state (JSON-serializable).
        extra: the caller's state (JSON-serializable), e.g. the data position.
        keep_last: delete all but the newest ``keep_last`` checkpoints after this one is in place.
        method_state: the ZO method's state tensors (momentum, Adam moments, HiZOO's Hessian), each
            saved over the flat range this rank holds (a replicated one whole).

    Returns:
        The checkpoint directory.
    """
    world_size, rank = get_world_size_and_rank()
    final = checkpoint_dir(root, step)
    staging = final.with_name(f".{final.name}.partial")
    if is_main_process():
        for leftover in Path(root).glob(".checkpoint-*.partial"):  # from a crashed save
            shutil.rmtree(leftover, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()

    name = f"rank-{rank:05d}-of-{world_size:05d}.safetensors"
    ranges = {s.name: [s.start, s.end] for s in shards}
    tensors = {}
    for shard in shards:
        with shard.swapped_in() as local:  # an NVMe-offloaded shard is read in first
            tensors[shard.name] = local.detach().to("cpu", copy=True).contiguous()
    for entry in method_state or []:
        ranges[entry.name] = [entry.offset, entry.offset + entry.tensor.numel()]
        tensors[entry.name] = entry.tensor.detach().reshape(-1).to("cpu", copy=True).contiguous()
    save_file(tensors, staging / name, metadata={"ranges": json.dumps(ranges)})
    digest = _fsync_and_hash(staging / name)
    written = all_gather_objects((name, digest, ranges))

    if is_main_process():
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world_size,
            "state": state,
            "extra": extra,
            "files": {n: {"sha256": d, "ranges": r} for n, d, r in written},
            "shapes": {**{s.name: list(s.shape) for s in shards},
                       **{e.name: list(e.shape) for e in method_state or []}},
            "dtypes": {**{s.name: str(s.param.dtype).removeprefix("torch.") for s in shards},
                       **{e.name: str(e.tensor.dtype).removeprefix("torch.") for e in method_state or []}},
        }
        _write_json_durably(staging / MANIFEST, manifest)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(final.parent)
        if keep_last:
            for old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of the checkpoint directory ``path``.

    Raises:
        CheckpointError: no such checkpoint, or its manifest is unreadable.
    """
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        hint = (f"the newest complete one there is {latest_checkpoint(path)}" if latest_checkpoint(path)
                else "pass a checkpoint-<step> directory written by save_checkpoint")
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST}): {hint}.")
    try:
        raw = json.loads(file.read_text())
        return Manifest(step=int(raw["step"]), world_size=int(raw["world_size"]), state=raw["state"],
                        extra=raw["extra"], files=raw["files"], shapes=raw["shapes"], dtypes=raw["dtypes"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{file} is unreadable or incomplete ({error!r}): resume from an older "
                              "checkpoint-<step> directory.") from None


def verify_files(path: str | os.PathLike, manifest: Manifest, names: Iterable[str]) -> None:
    """Check the SHA-256 of the shard files ``names`` against the manifest.

    Raises:
        CheckpointError: a file is missing or its bytes changed.
    """
    for name in names:
        file = Path(path) / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing from the checkpoint: resume from an older checkpoint.")
        if _sha256(file) != manifest.files[name]["sha256"]:
            raise CheckpointError(f"{file} does not match its checksum in {MANIFEST} (corrupt or modified): "
                                  "resume from an older checkpoint.")


def read_range(path: str | os.PathLike, manifest: Manifest, param: str, start: int, end: int) -> torch.Tensor:
    """Elements [start, end) of the full flat parameter ``param``, assembled from whichever files hold them."""
    out: torch.Tensor | None = None
    for name, entry in manifest.files.items():
        lo, hi = entry["ranges"].get(param, (0, 0))
        a, b = max(lo, start), min(hi, end)
        if a >= b:
            continue
        with safe_open(Path(path) / name, framework="pt") as f:
            piece = f.get_slice(param)[a - lo : b - lo]
        if out is None:
            out = torch.empty(end - start, dtype=piece.dtype)
        out[a - start : b - start] = piece
    if out is None:
        out = torch.empty(0, dtype=getattr(torch, manifest.dtypes[param]))
    return out


def load_sharded(path: str | os.PathLike, shards: list[ParamShard],
                 method_state: list[StateTensor] | None = None) -> Manifest:
    """Copy this rank's ranges of every trainable parameter from the checkpoint at ``path``.

    Works for any world size: each range is re-cut from the full-shape positions the files record.
    Collective only in that every rank checks a share of the files' checksums.

    Raises:
        CheckpointError: missing/corrupt checkpoint, or parameters that do not match the model.
    """
    manifest = read_manifest(path)
    world_size, rank = get_world_size_and_rank()
    files = sorted(manifest.files)
    verify_files(path, manifest, files[rank::world_size])
    expected = {**{s.name: list(s.shape) for s in shards}, **{e.name: list(e.shape) for e in method_state or []}}
    if expected != manifest.shapes:
        missing = sorted(set(expected) - set(manifest.shapes))
        unexpected = sorted(set(manifest.shapes) - set(expected))
        reshaped = sorted(n for n in set(expected) & set(manifest.shapes) if expected[n] != manifest.shapes[n])
        raise CheckpointError(
            f"the checkpoint {path} was written for other trainable parameters: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, different shape {reshaped[:5]}. Resume with the same model, "
            "tuning mode (full/LoRA/prefix/prompt), adapter settings and ZO method state (\"update\") as the run "
            "that wrote it."
        )
    with torch.no_grad():
        for shard in shards:
            values = read_range(path, manifest, shard.name, shard.start, shard.end)
            with shard.swapped_in() as local:  # an NVMe-offloaded shard is written back on exit
                local.copy_(values.to(shard.param.dtype))
        for entry in method_state or []:
            values = read_range(path, manifest, entry.name, entry.offset, entry.offset + entry.tensor.numel())
            entry.tensor.copy_(values.view(entry.tensor.shape))
    return manifest


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_and_hash(file: Path) -> str:
    with open(file, "rb") as f:
        os.fsync(f.fileno())
    return _sha256(file)


def _write_json_durably(file: Path, value: dict[str, Any]) -> None:
    with open(file, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
