"""Stale JIT build locks: found before anything builds, cleared or reported; never an endless wait.

Our host kernel (``cpu.py``) and DeepSpeed's ops (``deepspeed_shm_comm`` in ``init_distributed``,
``async_io`` for NVMe …) are built by ``torch.utils.cpp_extension.load`` into ``<root>/<op>/``
(``<root>``: ``TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions/py311_cpu``). The build is
guarded by ``<root>/<op>/lock``, a ``torch.utils.file_baton.FileBaton``: the builder creates it with
``O_CREAT | O_EXCL``, keeps it open while ninja compiles in that directory and deletes it after; every
other process polls until the file is gone, with no timeout. A builder killed mid-build (Ctrl-C, a
time limit, the OOM killer) leaves the file behind, and every later run sleeps forever.

So before anything builds, every lock under the root is judged:

- a process on this host holds it open (the builder) or works in its directory (ninja, g++): a live
  build; wait until it is gone (the builder may die too: judged again every second);
- younger than a few seconds: a builder may be between creating it and showing the open file; wait;
- nobody on this host uses it and the root is on a local file system (only this host's processes can
  build there), or it is older than any build takes: stale; removed, with one log line;
- nobody on this host uses it but the root is on a shared file system (another node may be building):
  wait up to a minute, then stop with the path and the ``rm`` command.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator

logger = logging.getLogger("subzero_ds")

# A lock this young may belong to a builder between creating the file and the open file showing in /proc.
YOUNG_SECONDS = 5.0
# No build of ours or DeepSpeed's takes this long (a CUDA op from scratch: minutes): the builder is gone.
GENEROUS_BUILD_SECONDS = 30 * 60.0
# How long a lock nobody here uses may stay on a shared file system before the run stops and says so.
SHARED_WAIT_SECONDS = 60.0
# File systems another node can build on (a lock there may be held by a process we cannot see).
_SHARED_FILE_SYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                        "afs", "panfs", "9p", "wekafs", "fuse")
# What runs in a build directory while torch's builder compiles (ninja and the compiler driver's children);
# any other process there (a user's shell looking around) builds nothing.
_BUILD_TOOLS = frozenset({"ninja", "c++", "g++", "gcc", "cc", "cc1", "cc1plus", "as", "ld", "collect2", "clang",
                          "clang++", "nvcc", "cicc", "ptxas", "fatbinary", "nvlink", "hipcc"})


class BuildLockError(RuntimeError):
    """A JIT build lock that may be stale but cannot be proven so; the message names it and the ``rm`` command."""


def extensions_root() -> Path:
    """The directory torch's ``load`` builds ops under (``TORCH_EXTENSIONS_DIR``, else its per-Python default)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    # As torch's _get_build_directory names it (that function creates directories, so it is not called).
    accelerator = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                   f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def clear_stale_build_locks(root: str | os.PathLike | None = None, shared_wait: float = SHARED_WAIT_SECONDS) -> None:
    """Settle every build lock under ``root`` (default :func:`extensions_root`) before anything builds there.

    Returns once no lock is left that no live build holds: live builds are waited for, stale locks removed.

    Raises:
        BuildLockError: a lock on a shared file system that nobody on this host uses stayed for
            ``shared_wait`` seconds (it names the lock and the ``rm`` command that clears it).
    """
    root = Path(root) if root is not None else extensions_root()
    if not root.is_dir():
        return
    shared = _shared_file_system(root)
    for lock in sorted(root.glob("*/lock")):
        _settle(lock, root, shared, time.monotonic() + shared_wait)


def _settle(lock: Path, root: Path, shared: str | None, deadline: float) -> None:
    """Return once ``lock`` is gone or removed as stale; raise BuildLockError past ``deadline`` if undecidable."""
    waiting_logged = False
    while True:
        verdict, age = _judge(lock, shared)
        if verdict == "gone":
            return
        if verdict == "stale":
            with _exclusive(root):  # one process removes it: a second cleaner must not delete a new builder's lock
                if _judge(lock, shared)[0] == "stale":
                    lock.unlink(missing_ok=True)
                    logger.warning(f"subzero_ds: removed the stale build lock {lock} ({_duration(age)} old, no "
                                   "process uses its directory: a build there was killed); the op is (re)built now.")
            return
        if verdict == "unknown" and time.monotonic() > deadline:
            raise BuildLockError(
                f"the JIT build lock {lock} is {_duration(age)} old and no process on this host is building in "
                f"{lock.parent}, but {root} is on a shared file system ({shared}) where another node may be. If no "
                f"other job is building there, remove it and run again: rm {lock}. (Or set TORCH_EXTENSIONS_DIR to a "
                "directory on this node's local disk.)"
            )
        if verdict == "held" and not waiting_logged and age > 10:
            logger.info(f"subzero_ds: waiting for the build that holds {lock} to finish")
            waiting_logged = True
        time.sleep(1.0)


def _judge(lock: Path, shared: str | None) -> tuple[str, float]:
    """("gone" | "held" | "young" | "stale" | "unknown", the lock's age in seconds)."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return "gone", 0.0
    users = _local_users(lock)
    if users:
        return "held", age
    if age < YOUNG_SECONDS:
        return "young", age
    if age > GENEROUS_BUILD_SECONDS or (users is not None and shared is None):
        return "stale", age
    return "unknown", age  # a shared file system, or no /proc to look at: only time tells


def _local_users(lock: Path) -> list[int] | None:
    """Processes on this host that hold ``lock`` open or compile in its directory; None without ``/proc``.

    Processes of other users are not readable and are skipped: they do not build in this user's cache.
    """
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target, directory = os.path.realpath(lock), os.path.realpath(lock.parent)
    users = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(f"{entry.path}/cwd")
            if (cwd == directory or cwd.startswith(directory + os.sep)) and _command(entry.path) in _BUILD_TOOLS:
                users.append(int(entry.name))
                continue
            for fd in os.scandir(f"{entry.path}/fd"):
                if os.readlink(fd.path) == target:
                    users.append(int(entry.name))
                    break
        except OSError:  # gone meanwhile, or another user's process
            continue
    return users


def _command(process: str) -> str:
    """The executable name of the process at ``/proc/<pid>`` (its ``comm``)."""
    with open(f"{process}/comm") as f:
        return f.read().strip()


def _shared_file_system(root: Path) -> str | None:
    """The type of the file system ``root`` is on if other hosts may write it ("unknown" if that cannot be
    read: assumed shared), else None."""
    fs = _file_system(root)
    if fs is None:
        return "unknown"
    return fs if any(fs == kind or fs.startswith(kind + ".") for kind in _SHARED_FILE_SYSTEMS) else None


def _file_system(path: Path) -> str | None:
    """The type of the file system ``path`` is on (from /proc/mounts), or None where that cannot be read."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    real = os.path.realpath(path)
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``root`` (released by the kernel if this process dies; none where unsupported)."""
    try:
        fd = os.open(root, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # some network file systems refuse flock on a directory
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


__all__ = ["BuildLockError", "clear_stale_build_locks", "extensions_root"]
