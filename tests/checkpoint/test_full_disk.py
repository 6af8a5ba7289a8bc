"""A full disk during a checkpoint: one clear error, no partial directory, the earlier checkpoints intact.

The writer is made to fail as a full disk does (safetensors' SafetensorError quoting ENOSPC, an OSError from the
manifest, or too little free space to begin with), so these run anywhere; one test fills a real 1.2 MB tmpfs
(where one can be mounted), and ``tests/distributed/test_full_disk_run.py`` runs the CLI on one.
"""

import errno
import shutil

import pytest
import torch
from safetensors import SafetensorError

import subzero_ds
from subzero_ds.checkpoint import sharded
from subzero_ds.checkpoint.export import iter_full_state
from subzero_ds.checkpoint.sharded import DiskFullError, checkpoint_space_warning, is_disk_full, latest_checkpoint
import helpers.tmpfs
from helpers.configs import zo_section
from helpers.tiny import pattern_batch, tiny_model


def make_engine():
    config = {"zero_optimization": {"stage": 3},
              "subzero": zo_section(lr=1e-3, eps=1e-3, rank=4, seed=7)}
    return subzero_ds.initialize(model=tiny_model("llama"), config=config)


def no_space(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def manifest_no_space(file, value):
    raise OSError(errno.ENOSPC, "No space left on device", str(file))


@pytest.mark.parametrize("failing", ["shard file", "manifest", "too little free space"])
def test_a_full_disk_is_one_clear_error_and_the_last_checkpoint_still_resumes(tmp_path, monkeypatch, failing):
    engine = make_engine()
    engine.step(pattern_batch(4))
    good = engine.save_checkpoint(tmp_path, keep_last=3)
    saved = dict(iter_full_state(engine.module))
    engine.step(pattern_batch(4, seed=1))

    if failing == "shard file":
        monkeypatch.setattr(sharded, "save_file", no_space)
    elif failing == "manifest":
        monkeypatch.setattr(sharded, "_write_json_durably", manifest_no_space)
    else:
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(sharded.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(DiskFullError) as error:
        engine.save_checkpoint(tmp_path, keep_last=3)
    message = str(error.value)
    assert f"checkpoint-2 could not be written to {tmp_path}" in message
    assert "It needs" in message and "are free there" in message  # bytes needed and free
    assert f"the last good checkpoint is {good}" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no .checkpoint-2.partial left
    monkeypatch.undo()

    resumed = make_engine()
    resumed.load_checkpoint(tmp_path)
    assert resumed.global_step == 1
    state = dict(iter_full_state(resumed.module))
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_disk_full_is_recognized_through_its_wrappers():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as cause:
            raise RuntimeError("save failed") from cause
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(PermissionError(errno.EACCES, "Permission denied"))


def test_the_start_up_warning_counts_every_kept_checkpoint_and_the_final_model(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(sharded.shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    assert checkpoint_space_warning(tmp_path, 2_000, keep=3, final_bytes=1_000) is None  # 4 x 2000 + 1000 fit
    warning = checkpoint_space_warning(tmp_path, 2_000, keep=4, final_bytes=1_000)  # 5 x 2000 + 1000 do not
    assert warning.startswith(f"{tmp_path} has 9.8 KiB for this run, but 4 + 1 checkpoints of 2.0 KiB")
    assert "--save_total_limit" in warning and "--output_dir" in warning
    assert checkpoint_space_warning(tmp_path, 0, keep=3, final_bytes=20_000) is not None  # no checkpoints: the model
    assert latest_checkpoint(tmp_path) is None


@pytest.fixture
def small_tmpfs(tmp_path):
    with helpers.tmpfs.small_tmpfs(tmp_path) as mount_point:
        yield mount_point


def test_a_real_full_disk_in_the_middle_of_a_write_leaves_nothing_behind(small_tmpfs, monkeypatch):
    monkeypatch.setattr(sharded, "_check_room", lambda root, needed: None)  # let the write itself run out of space
    engine = make_engine()
    saved = []
    with pytest.raises(DiskFullError) as error:
        while True:  # 345 KB a checkpoint: the fourth does not fit in 1.2 MB
            engine.step(pattern_batch(4, seed=engine.global_step))
            saved.append(engine.save_checkpoint(small_tmpfs, keep_last=5))
    assert len(saved) == 3 and "No space left on device" in str(error.value)
    assert sorted(p.name for p in small_tmpfs.iterdir()) == [p.name for p in saved]  # no partial directory
    make_engine().load_checkpoint(saved[-1])  # intact
