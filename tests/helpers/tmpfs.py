"""A small tmpfs for the full-disk tests (mounting needs root: the test is skipped with the reason otherwise)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


@contextlib.contextmanager
def small_tmpfs(parent: Path, size: str = "1200k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``parent/tmpfs`` for the block, unmounted after."""
    mount_point = parent / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'not root'}): "
                    "tests/checkpoint/test_full_disk.py fails the writer by hand instead")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
