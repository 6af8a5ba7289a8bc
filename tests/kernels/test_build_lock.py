"""Stale JIT build locks (torch's FileBaton ``lock`` files): cleared or reported, never waited on forever."""

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from subzero_ds.kernels import build_locks
from subzero_ds.kernels.build_locks import BuildLockError, clear_stale_build_locks


def make_lock(root, op="deepspeed_shm_comm", age=3600.0):
    """``root/op/lock`` as a killed build leaves it: empty, last touched ``age`` seconds ago."""
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - age, time.time() - age))
    return lock


def test_a_lock_nobody_holds_on_a_local_disk_is_removed_with_one_log_line(tmp_path, caplog):
    ours, deepspeeds = make_lock(tmp_path, "subzero_ds_cpu_kernels_avx2", age=60), make_lock(tmp_path, age=60)
    with caplog.at_level(logging.WARNING, logger="subzero_ds"):
        clear_stale_build_locks(tmp_path)
    assert not ours.exists() and not deepspeeds.exists()
    removed = [r.getMessage() for r in caplog.records if "stale build lock" in r.getMessage()]
    assert len(removed) == 2 and str(ours) in removed[0] + removed[1]


def test_a_lock_a_live_builder_holds_is_left_until_the_builder_dies(tmp_path):
    lock = make_lock(tmp_path, age=60)
    # A "builder" that holds the lock open (as FileBaton does while ninja runs), then is killed without deleting it.
    holder = subprocess.Popen([sys.executable, "-c", f"import os, time; fd = os.open({str(lock)!r}, os.O_RDONLY); "
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert build_locks._judge(lock, None)[0] == "held"
        killer = subprocess.Popen(["sh", "-c", f"sleep 2; kill -KILL {holder.pid}"])
        start = time.monotonic()
        clear_stale_build_locks(tmp_path)  # waits while it is held, then finds it stale
        assert 1.5 < time.monotonic() - start < 30
        assert not lock.exists()
        killer.wait()
    finally:
        holder.kill()
        holder.wait()


def test_a_compiler_working_in_the_directory_counts_as_a_live_build(tmp_path, monkeypatch):
    lock = make_lock(tmp_path, age=60)
    sleeper = subprocess.Popen(["sleep", "30"], cwd=lock.parent)  # "sleep" is no build tool: not a builder
    try:
        time.sleep(0.2)
        assert build_locks._judge(lock, None)[0] == "stale"
        monkeypatch.setattr(build_locks, "_BUILD_TOOLS", frozenset({"sleep"}))
        assert build_locks._judge(lock, None)[0] == "held"
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()


def test_a_young_lock_is_given_time_before_it_is_judged(tmp_path):
    lock = make_lock(tmp_path, age=build_locks.YOUNG_SECONDS - 1.5)
    assert build_locks._judge(lock, None)[0] == "young"
    start = time.monotonic()
    clear_stale_build_locks(tmp_path)
    assert time.monotonic() - start > 1.0 and not lock.exists()


def test_a_lock_on_a_shared_file_system_is_reported_with_its_path_and_the_rm_command(tmp_path, monkeypatch):
    monkeypatch.setattr(build_locks, "_file_system", lambda path: "nfs4")
    lock = make_lock(tmp_path, age=120)  # another node may be building: only time tells
    start = time.monotonic()
    with pytest.raises(BuildLockError) as error:
        clear_stale_build_locks(tmp_path, shared_wait=2)
    assert time.monotonic() - start < 10
    assert f"rm {lock}" in str(error.value) and "nfs4" in str(error.value)
    assert lock.exists()  # not ours to remove


def test_a_lock_older_than_any_build_is_removed_even_on_a_shared_file_system(tmp_path, monkeypatch):
    monkeypatch.setattr(build_locks, "_file_system", lambda path: "lustre")
    lock = make_lock(tmp_path, age=build_locks.GENEROUS_BUILD_SECONDS + 60)
    clear_stale_build_locks(tmp_path, shared_wait=0)
    assert not lock.exists()


def test_the_root_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build_locks.extensions_root() == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert build_locks.extensions_root().name.startswith(f"py{sys.version_info.major}{sys.version_info.minor}")


def test_a_file_system_that_cannot_be_told_counts_as_shared(tmp_path, monkeypatch):
    monkeypatch.setattr(build_locks, "_file_system", lambda path: None)  # no /proc/mounts
    lock = make_lock(tmp_path, age=120)
    with pytest.raises(BuildLockError, match="shared file system \\(unknown\\)"):
        clear_stale_build_locks(tmp_path, shared_wait=0)
    assert lock.exists()
