"""``subzero-export``: turn a sharded checkpoint into a Hugging Face model directory, offline, without ranks.

    subzero-export outputs/run/checkpoints/checkpoint-2000 outputs/run/hf-2000 [--base_model PATH]

The base model (its frozen weights, config and architecture) is loaded with ``from_pretrained``
from the path the training run recorded in the manifest (or ``--base_model``); the trainable
parameters are assembled from every rank's shard file. Full fine-tuning writes a complete model
directory; PEFT runs write the adapter (``PeftModel.from_pretrained(base, out)`` loads it), or with
``--merge`` the merged model. The output is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

import torch

from ..adapters import AdapterOptions, Tuning, add_adapter
from .sharded import CheckpointError, latest_checkpoint, read_manifest, read_range, verify_files
from .export import save_hf_weights


def export_checkpoint(checkpoint: str | Path, output: str | Path, base_model: str | None = None,
                      merge: bool = False) -> Path:
    """Write the model of ``checkpoint`` to ``output`` as a Hugging Face directory.

    Args:
        checkpoint: a ``checkpoint-<step>`` directory, or a directory of them (the newest is used).
        output: the directory to write (replaced if it exists).
        base_model: the base model directory or hub id; default: the one the run recorded.
        merge: for PEFT checkpoints, merge the adapter into the base weights.

    Returns:
        The output directory.

    Raises:
        CheckpointError: unreadable/corrupt checkpoint, or one that does not fit the base model.
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    checkpoint = Path(checkpoint)
    if not (checkpoint / "manifest.json").is_file() and latest_checkpoint(checkpoint) is not None:
        checkpoint = latest_checkpoint(checkpoint)
    manifest = read_manifest(checkpoint)
    verify_files(checkpoint, manifest, manifest.files)
    extra = manifest.extra
    recorded = extra.get("model_name_or_path")
    base_model = base_model or recorded
    if not base_model:
        raise CheckpointError(f"{checkpoint} does not record its base model (it was not written by subzero-train): "
                              "pass --base_model with the model directory the run started from")
    looks_local = recorded is not None and (recorded.startswith(("/", ".", "~")) or recorded.count("/") > 1)
    if base_model == recorded and looks_local and not Path(recorded).expanduser().exists():
        raise CheckpointError(f"{checkpoint} was trained from the base model {recorded}, which no longer exists: "
                              "pass --base_model with that model's directory (or its hub id)")
    dtype = getattr(torch, next(iter(manifest.dtypes.values()), "float32"))
    model_class = AutoModelForMaskedLM if extra.get("masked_lm") else AutoModelForCausalLM
    model = model_class.from_pretrained(base_model, dtype=dtype)
    tuning = Tuning(extra.get("tuning", "full"))
    adapter = dict(extra.get("adapter") or {})
    if "lora_target_modules" in adapter:
        adapter["lora_target_modules"] = tuple(adapter["lora_target_modules"])
    model = add_adapter(model, tuning, AdapterOptions(**adapter), masked_lm=bool(extra.get("masked_lm")))

    params = dict(model.named_parameters())
    missing = [n for n in manifest.shapes if n not in params]
    wrong = [n for n in manifest.shapes if n in params and list(params[n].shape) != manifest.shapes[n]]
    if missing or wrong:
        raise CheckpointError(f"{checkpoint} does not fit {base_model}: parameters missing from the model "
                              f"{missing[:5]}, with other shapes {wrong[:5]}. Pass the --base_model the run used.")
    with torch.no_grad():
        for name, shape in manifest.shapes.items():
            values = read_range(checkpoint, manifest, name, 0, math.prod(shape))
            params[name].copy_(values.view(shape))

    output = Path(output)
    if tuning is Tuning.FULL:
        save_hf_weights(model, output)
        return output
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    if merge:
        model.merge_and_unload().save_pretrained(staging)
    else:
        model.save_pretrained(staging)
    shutil.rmtree(output, ignore_errors=True)
    staging.rename(output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="subzero-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint-<step> directory (or a directory of them: the newest)")
    parser.add_argument("output", type=Path, help="Hugging Face model directory to write")
    parser.add_argument("--base_model", default=None, help="base model directory or hub id (default: the run's)")
    parser.add_argument("--merge", action="store_true", help="PEFT: write the merged model instead of the adapter")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.output, args.base_model, args.merge)
    except (CheckpointError, OSError, ValueError) as error:
        print(f"subzero-export: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
