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

import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..distributed import all_gather_objects, barrier, get_world_size_and_rank, is_main_process, sum_over_ranks
from ..methods.base import StateTensor
from ..zero.shards import ParamShard

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
_BLOCK = 64 * 1024  # slack per file when checking room: its header, the file system's blocks
_DISK_FULL_MARK = "[disk full] "  # how a rank's failed write tells the others it ran out of space


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded (missing, incomplete, corrupt, from another run) or written."""


class DiskFullError(CheckpointError):
    """A checkpoint that did not fit on its file system; nothing of it is left behind."""


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

    Raises:
        DiskFullError: on every rank, when the file system has no room for it (checked before writing,
            and any write that still runs out of space); its partial directory is removed.
        CheckpointError: on every rank, when another write fails on any rank (the message names it).
    """
    world_size, rank = get_world_size_and_rank()
    final = checkpoint_dir(root, step)
    staging = final.with_name(f".{final.name}.partial")
    name = f"rank-{rank:05d}-of-{world_size:05d}.safetensors"
    tensors, ranges = _this_ranks_tensors(shards, method_state or [])
    # The whole checkpoint's size (every rank's file, with a block of slack each and one for the manifest).
    (total,) = sum_over_ranks(float(sum(t.numel() * t.element_size() for t in tensors.values()) + _BLOCK))
    needed = int(total) + _BLOCK

    # Rank 0 prepares the directory, or finds the disk too small, and tells every rank (the barrier before writing).
    def prepare() -> None:
        for leftover in Path(root).glob(".checkpoint-*.partial"):  # from a crashed save
            shutil.rmtree(leftover, ignore_errors=True)
        _check_room(root, needed)
        staging.mkdir(parents=True)

    problem = _attempt(prepare) if is_main_process() else None
    _agree_or_raise(all_gather_objects(problem)[0], root, step, needed, staging)

    def write_this_ranks_file() -> tuple[str, str, dict[str, list[int]]]:
        save_file(tensors, staging / name, metadata={"ranges": json.dumps(ranges)})
        return name, _fsync_and_hash(staging / name), ranges

    written = all_gather_objects(_attempt(write_this_ranks_file, returns=True))
    _agree_or_raise(next((w for w in written if isinstance(w, str)), None), root, step, needed, staging)

    problem = _attempt(lambda: _publish(root, final, staging, step, world_size, state, extra, written, shards,
                                        method_state or [], keep_last)) if is_main_process() else None
    _agree_or_raise(all_gather_objects(problem)[0], root, step, needed, staging)  # the barrier after the rename
    return final


def _this_ranks_tensors(shards: list[ParamShard], method_state: list[StateTensor]
                        ) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Host copies of this rank's shards and method state, and the flat range of each."""
    ranges = {s.name: [s.start, s.end] for s in shards}
    tensors = {}
    for shard in shards:
        with shard.swapped_in() as local:  # an NVMe-offloaded shard is read in first
            tensors[shard.name] = local.detach().to("cpu", copy=True).contiguous()
    for entry in method_state:
        ranges[entry.name] = [entry.offset, entry.offset + entry.tensor.numel()]
        tensors[entry.name] = entry.tensor.detach().reshape(-1).to("cpu", copy=True).contiguous()
    return tensors, ranges


def _publish(root: str | os.PathLike, final: Path, staging: Path, step: int, world_size: int,
             state: dict[str, Any], extra: dict[str, Any], written: list[tuple[str, str, dict[str, list[int]]]],
             shards: list[ParamShard], method_state: list[StateTensor], keep_last: int | None) -> None:
    """Rank 0: the manifest (last, durably), the rename into place, then the oldest checkpoints pruned."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "state": state,
        "extra": extra,
        "files": {n: {"sha256": d, "ranges": r} for n, d, r in written},
        "shapes": {**{s.name: list(s.shape) for s in shards}, **{e.name: list(e.shape) for e in method_state}},
        "dtypes": {**{s.name: str(s.param.dtype).removeprefix("torch.") for s in shards},
                   **{e.name: str(e.tensor.dtype).removeprefix("torch.") for e in method_state}},
    }
    _write_json_durably(staging / MANIFEST, manifest)
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def _attempt(write: Callable[[], Any], returns: bool = False) -> Any:
    """Run ``write``; a failure becomes its description (a str) so every rank can learn of it, not hang."""
    try:
        result = write()
    except (OSError, SafetensorError) as error:
        return f"{_DISK_FULL_MARK if is_disk_full(error) else ''}{error.strerror or error if isinstance(error, OSError) else error}"
    return result if returns else None


def _agree_or_raise(problem: str | None, root: str | os.PathLike, step: int, needed: int, staging: Path) -> None:
    """Raise on every rank if any rank reported ``problem``, after rank 0 removed the partial directory."""
    if problem is None:
        return
    if is_main_process():
        shutil.rmtree(staging, ignore_errors=True)  # its space is the user's again
    barrier()
    last = latest_checkpoint(root)
    last_good = (f"the last good checkpoint is {last} (--resume continues from it)" if last
                 else "no earlier checkpoint exists")
    if problem.startswith(_DISK_FULL_MARK):
        free = shutil.disk_usage(root).free
        raise DiskFullError(
            f"checkpoint-{step} could not be written to {root}: the file system is full "
            f"({problem.removeprefix(_DISK_FULL_MARK)}). It needs {_size(needed)} and {_size(free)} are free there. "
            f"Nothing of it is left behind; {last_good}. Free space there, keep fewer checkpoints "
            "(--save_total_limit, or keep_last), or write to a larger disk (--output_dir)."
        )
    raise CheckpointError(f"checkpoint-{step} could not be written to {root} ({problem}); its partial directory was "
                          f"removed and {last_good}. Check that every rank can write there.")


def _check_room(root: str | os.PathLike, needed: int) -> None:
    """Raise ENOSPC before anything is written when the file system under ``root`` cannot hold ``needed`` bytes."""
    Path(root).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < needed:
        raise OSError(errno.ENOSPC, "not enough free space, found before writing")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) says the disk or the user's quota is full (or is a DiskFullError)."""
    while error is not None:
        if isinstance(error, DiskFullError):
            return True
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in ("No space left on device", "Disk quota exceeded")):
            return True  # safetensors' SafetensorError only quotes the OS error
        error = error.__cause__ or error.__context__
    return False


def checkpoint_space_warning(output_dir: str | os.PathLike, checkpoint_bytes: int, keep: int,
                             final_bytes: int) -> str | None:
    """A warning when ``output_dir`` cannot hold ``keep`` + 1 checkpoints (the newest is written before the
    oldest goes) and the final model; None when it can. Checkpoints already under ``output_dir/checkpoints``
    count as room: they are rotated out."""
    needed = (keep + 1) * checkpoint_bytes + final_bytes if checkpoint_bytes else final_bytes
    existing = sum(f.stat().st_size for c in list_checkpoints(Path(output_dir) / "checkpoints") for f in c.iterdir())
    free = shutil.disk_usage(output_dir).free + existing
    if free >= needed:
        return None
    held = f"{keep} + 1 checkpoints of {_size(checkpoint_bytes)} and " if checkpoint_bytes else ""
    return (f"{output_dir} has {_size(free)} for this run, but {held}the final model of {_size(final_bytes)} need "
            f"{_size(needed)}: the run will stop when the disk is full. Free space, lower --save_total_limit, "
            "or pass an --output_dir on a larger disk.")


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


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
            if (secondary := shard.secondary()) is not None:  # hpZ: the copy forwards gather from
                secondary.copy_(read_range(path, manifest, shard.name, shard.secondary_start, shard.secondary_end)
                                .to(shard.param.dtype))
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
