"""NVMe offload settings are checked before any work starts: swap directory, libaio, buffer size."""

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from subzero_ds.config import ConfigError, environment
from subzero_ds.config.deepspeed import parse_deepspeed
from subzero_ds.config.errors import raise_problems

REPO = Path(__file__).resolve().parents[2]
KEY = "zero_optimization.offload_param.nvme_path"


def check_offload_paths(ds_config: dict) -> None:
    settings, problems = parse_deepspeed(ds_config)
    assert not problems
    raise_problems(environment.nvme_offload_problems(settings), "the DeepSpeed config")


def check_nvme_buffers(ds_config: dict, numels: dict, world_size: int) -> None:
    settings, problems = parse_deepspeed(ds_config)
    assert not problems
    raise_problems(environment.nvme_buffer_problems(settings, numels, world_size), "the DeepSpeed config")


def nvme_config(path, **offload) -> dict:
    return {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(path), **offload}}}


@pytest.fixture(autouse=True)
def libaio_present(request, monkeypatch):
    """Most tests are about the path checks: the libaio probe answers yes (tests using ``real_libaio`` run it)."""
    if "real_libaio" not in request.fixturenames:
        monkeypatch.setattr(environment, "async_io_available", lambda: True)


@pytest.fixture
def real_libaio():
    """The unpatched async_io probe, where libaio and a C compiler are installed (scripts/setup.sh installs them)."""
    missing = [what for what, there in [("libaio.so", ctypes.util.find_library("aio")),
                                        ("/usr/include/libaio.h", Path("/usr/include/libaio.h").is_file()),
                                        ("gcc", shutil.which("gcc"))] if not there]
    if missing:
        pytest.skip(f"the real libaio probe needs {', '.join(missing)} (apt-get install libaio-dev gcc)")


def test_existing_writable_directory_passes(tmp_path):
    check_offload_paths(nvme_config(tmp_path))


def test_missing_directory_names_key_value_and_fix(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(ConfigError) as error:
        check_offload_paths(nvme_config(missing))
    message = str(error.value)
    assert f"`{KEY}`" in message and str(missing) in message and "does not exist" in message
    assert f"mkdir -p {missing}" in message


def test_a_file_is_not_a_swap_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_offload_paths(nvme_config(tmp_path / "file"))


def test_read_only_directory_is_rejected(tmp_path, monkeypatch):
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write anywhere: make access(2) answer as for a read-only mount
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(read_only) else real_access(path, mode))
    with pytest.raises(ConfigError, match="cannot write to"):
        check_offload_paths(nvme_config(read_only))


def test_missing_libaio_is_reported_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(environment, "async_io_available", lambda: False)
    with pytest.raises(ConfigError) as error:
        check_offload_paths(nvme_config(tmp_path / "missing"))
    message = str(error.value)
    assert "does not exist" in message and "libaio-dev" in message  # both problems at once


def test_installed_libaio_passes_the_real_probe(tmp_path, real_libaio):
    assert environment.async_io_available()  # DeepSpeed's own compile-and-link probe of io_submit
    check_offload_paths(nvme_config(tmp_path))


def test_a_linker_without_libaio_fails_the_real_probe_with_the_install_command(tmp_path, real_libaio, monkeypatch):
    """DeepSpeed's probe links a program against -laio: with a compiler that cannot find libaio (a
    wrapper around gcc that fails on -laio as ld does without it), the real check reports it."""
    compiler = tmp_path / "cc-without-libaio"
    compiler.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-laio" ] && { echo "ld: cannot find -laio" >&2; exit 1; }; done\n'
                        f'exec {shutil.which("gcc")} "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))  # distutils' customize_compiler: the compiler and the linker
    assert not environment.async_io_available()
    with pytest.raises(ConfigError) as error:
        check_offload_paths(nvme_config(tmp_path))
    assert "libaio-dev" in str(error.value) and "async_io" in str(error.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="not root: test_read_only_directory_is_rejected runs the real check")
def test_read_only_directory_is_rejected_for_a_real_non_root_user():
    """No patched os.access: a child process imports as root, drops to nobody (uid 65534) and checks
    a root-owned 0o555 directory, which access(2) then really reports as not writable."""
    shared = Path(tempfile.mkdtemp(prefix="subzero-nobody-"))  # in /tmp: pytest's own tmp is root-only (0o700)
    shared.chmod(0o755)
    read_only = shared / "ro"
    read_only.mkdir(mode=0o555)
    writable = shared / "rw"
    writable.mkdir()
    os.chown(writable, 65534, 65534)
    script = textwrap.dedent(f"""
        import os
        from subzero_ds.config import environment
        from subzero_ds.config.deepspeed import parse_deepspeed
        libaio = environment.async_io_available()  # as root: the probe compiles with files only root may read
        environment.async_io_available = lambda: libaio
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        assert os.geteuid() == 65534
        assert not environment.nvme_offload_problems(parse_deepspeed({nvme_config(writable)!r})[0])  # nobody's own directory passes
        print(*environment.nvme_offload_problems(parse_deepspeed({nvme_config(read_only)!r})[0]))
    """)
    try:
        finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(shared)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "cannot write to" in finished.stdout and str(read_only) in finished.stdout and f"`{KEY}`" in finished.stdout


@pytest.mark.parametrize("zero", [{"stage": 3}, {"stage": 3, "offload_param": {"device": "cpu", "nvme_path": "/no/such"}}])
def test_other_devices_need_no_swap_directory(zero, monkeypatch):
    monkeypatch.setattr(environment, "async_io_available", lambda: False)
    check_offload_paths({"zero_optimization": zero})


def test_buffer_smaller_than_a_swapped_partition_names_the_parameter_and_the_value(tmp_path):
    numels = {"model.embed_tokens.weight": 32000 * 4096, "model.norm.weight": 4096}
    with pytest.raises(ConfigError) as error:
        check_nvme_buffers(nvme_config(tmp_path, buffer_size=10_000_000), numels, world_size=2)
    message = str(error.value)
    assert "'model.embed_tokens.weight'" in message and "buffer_size" in message
    assert "at least 65536000" in message  # ceil(32000·4096 / 2)


def test_buffer_fits_every_partition(tmp_path):
    numels = {"model.embed_tokens.weight": 32000 * 4096}
    check_nvme_buffers(nvme_config(tmp_path), numels, world_size=2)  # default buffer_size 1e8
    check_nvme_buffers(nvme_config(tmp_path, buffer_size=65_536_000), numels, world_size=2)


def test_partitions_below_one_mib_are_never_swapped(tmp_path):
    # 131072 fp32 elements per rank = 512 KiB: DeepSpeed keeps it in memory, whatever buffer_size says.
    check_nvme_buffers(nvme_config(tmp_path, buffer_size=1000), {"w": 2 * 131072}, world_size=2)
    with pytest.raises(ConfigError):
        check_nvme_buffers(nvme_config(tmp_path, buffer_size=1000), {"w": 2 * 262144}, world_size=2)


def test_shipped_nvme_config_names_a_swap_directory():
    shipped = json.loads((REPO / "ds_configs" / "zero3_subzero_offload_nvme.json").read_text())
    offload = shipped["zero_optimization"]["offload_param"]
    assert offload["device"] == "nvme" and offload["nvme_path"]
