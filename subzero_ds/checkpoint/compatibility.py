"""Whether a checkpoint can continue this run: the same directions, from the same generator.

A ZO trajectory is a pure function of (θ, the run's settings, the step): a resumed run continues it
only if every setting that defines a direction, or the meaning of the method's saved state, is the
one the checkpoint was written with (``SubZeroConfig.direction_settings``), and if directions are
drawn by the same generator. Data compatibility (same examples, seed and global batch) is the
training front end's to check, with what it saved beside the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..kernels import GENERATOR
from .sharded import CheckpointError, Manifest


def check_resumable(path: Path, manifest: Manifest, direction_settings: dict[str, Any]) -> None:
    """Refuse a checkpoint whose directions would differ from this run's.

    Args:
        path: the checkpoint directory (for the message).
        manifest: its manifest.
        direction_settings: this run's ``SubZeroConfig.direction_settings()``.

    Raises:
        CheckpointError: naming the settings that differ, or the other generator, and what to do.
    """
    saved = manifest.state["settings"]
    changed = [k for k in direction_settings if saved.get(k) != direction_settings[k]]
    if changed:
        raise CheckpointError(
            f"the checkpoint {path} was written with " + ", ".join(f"subzero.{k}={saved.get(k)!r}" for k in changed)
            + " but this run has " + ", ".join(f"{direction_settings[k]!r}" for k in changed) + ": those settings "
            "define every direction, so the resumed run would not continue the same trajectory. Use the same values."
        )
    if manifest.state.get("generator") != GENERATOR:
        raise CheckpointError(
            f"the checkpoint {path} was written with the direction generator "
            f"{manifest.state.get('generator', 'of subzero_ds before 0.2 (per-block torch.Generator)')!r}, "
            f"but this version draws directions with {GENERATOR!r}: the resumed run would follow other "
            "directions. Resume with the subzero_ds version that wrote it, or export it "
            "(`subzero-export`) and start a new run from the exported weights."
        )
