"""scripts/wheelhouse.sh and the optional extras it leaves out.

The wheelhouse is the offline install for air-gapped GPU clusters: under 48 MiB, without torch,
triton, nvidia-* (CUDA), numpy, nor the `hub`/`plot`/`mpi` extras; it must install with
`pip install --no-index` next to torch and numpy alone. A package of a left-out extra that is
missing when needed is reported with the extra that brings it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from subzero_ds.tools.plot import main as plot_main
from subzero_ds.tasks import DataError, get_task, load_samples

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "wheelhouse.sh"
BUDGET = 48 * 2**20
# The cluster's own (torch and what comes with it), and the extras too big for the budget.
LEFT_OUT = {"torch", "triton", "numpy", "datasets", "pyarrow", "pandas", "matplotlib", "pillow", "mpi4py"}
NEEDED = {"subzero-ds", "deepspeed", "transformers", "pydantic", "peft", "accelerate", "pytest", "hypothesis"}


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def _distribution(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def _offline_env() -> dict[str, str]:
    """The environment minus every pip setting: no index, no find-links or constraints of this machine."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _torch_image(folder: Path) -> Path:
    """``folder`` holding torch, numpy and what torch requires, as a cluster image has them installed:
    links to this interpreter's installed copies (installing a torch wheel would take a minute)."""
    from packaging.requirements import Requirement

    folder.mkdir()
    wanted, seen = ["torch", "numpy"], set()
    while wanted:
        name = wanted.pop()
        distribution = importlib.metadata.distribution(name)
        key = distribution.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for requirement in map(Requirement, distribution.requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                wanted.append(requirement.name)
        for top in {file.parts[0] for file in distribution.files or []} - {"..", "__pycache__"}:
            if not (folder / top).exists():
                (folder / top).symlink_to(distribution.locate_file(top))
    return folder


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Skips unless the package registry answers (the wheelhouse downloads from it)."""
    folder = tmp_path_factory.mktemp("probe")
    try:
        probe = _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "six", "-d", str(folder)], timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("the package registry did not answer in 120 s (pip download six): the wheelhouse needs it")
    if probe.returncode != 0:
        pytest.skip(f"the package registry is unreachable (pip download six failed): {probe.stderr.strip()[-300:]}")


def test_wheelhouse_installs_offline_next_to_torch(registry, tmp_path):
    version = f"{sys.version_info.major}.{sys.version_info.minor}"  # so that its wheels install here
    house = tmp_path / "wheelhouse"
    built = _run(["bash", str(SCRIPT), str(house), "--python", version],
                 env=os.environ | {"PYTHON": sys.executable}, timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert "MiB in all" in built.stdout

    wheels = sorted(house.iterdir())
    assert all(w.suffix == ".whl" for w in wheels), [w.name for w in wheels]
    total = sum(w.stat().st_size for w in wheels)
    assert total < BUDGET, f"{total / 2**20:.1f} MiB"
    names = {_distribution(w) for w in wheels}
    assert not names & LEFT_OUT
    assert not {n for n in names if n.startswith("nvidia-")} - {"nvidia-ml-py"}  # CUDA libraries
    assert NEEDED <= names, NEEDED - names

    # The project's wheel carries every file of the package, data files (the C++ kernel source) too.
    (project,) = house.glob("subzero_ds-*.whl")
    with zipfile.ZipFile(project) as archive:
        packaged = set(archive.namelist())
    tracked = _run(["git", "ls-files", "subzero_ds"], cwd=REPO, timeout=60).stdout.split()
    assert tracked and not set(tracked) - packaged, set(tracked) - packaged

    # DeepSpeed is built for CUDA with nothing compiled: every op JIT-builds on the cluster.
    (deepspeed,) = house.glob("deepspeed-*-py3-none-any.whl")
    with zipfile.ZipFile(deepspeed) as archive:
        recorded = archive.read("deepspeed/git_version_info_installed.py").decode()
        assert not any(name.endswith(".so") for name in archive.namelist())
    assert "accelerator_name='cuda'" in recorded
    assert "True" not in recorded.split("installed_ops=")[1].splitlines()[0]
    assert "nvidia-ml-py" in names

    # A fresh venv that sees only torch and numpy (and torch's requirements), as the cluster image has,
    # then the offline install.
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=300).returncode == 0
    python = str(venv / "bin" / "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], timeout=60).stdout.strip()
    Path(site, "cluster_image.pth").write_text(str(_torch_image(tmp_path / "image")) + "\n")
    # This pip installs into the venv (--python): the venv has no pip, nor the old setuptools pip would bring.
    offline = _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-compile", "--no-index",
                    "--find-links", str(house), "subzero_ds[test-core]"], env=_offline_env(), timeout=900)
    assert offline.returncode == 0, offline.stderr[-3000:]

    # Run outside the repository, so that the installed package is the one imported.
    imported = _run([python, "-c", "import subzero_ds, deepspeed, pytest, hypothesis; print(subzero_ds.__file__)"],
                    cwd=tmp_path, timeout=300)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.splitlines()[-1].startswith(str(venv))  # after DeepSpeed's accelerator line
    usage = _run([python, "-m", "subzero_ds.train", "--help"], cwd=tmp_path, timeout=300)
    assert usage.returncode == 0, usage.stderr[-3000:]
    assert "usage: subzero-train" in usage.stdout and "--deepspeed_config" in usage.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        ([], "missing DIR"),
        (["a", "b"], "one DIR only"),
        (["a", "--python", "3"], "--python takes MAJOR.MINOR"),
        (["a", "--torch", "2.6.0+cu124"], "--torch takes a release"),
        (["a", "--python"], "--python needs a version"),
        (["a", "--frobnicate"], "unknown option --frobnicate"),
    ],
)
def test_wheelhouse_bad_arguments_print_usage_and_exit_2(tmp_path, arguments, message):
    result = _run(["bash", str(SCRIPT), *arguments], cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "usage: scripts/wheelhouse.sh DIR" in result.stderr
    assert not (tmp_path / "a").exists()


def test_wheelhouse_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "old.whl").write_text("")
    result = _run(["bash", str(SCRIPT), str(tmp_path)], env=os.environ | {"PYTHON": sys.executable}, timeout=60)
    assert result.returncode == 1 and "is not empty" in result.stderr


def test_missing_datasets_names_the_hub_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(DataError) as error:
        load_samples(get_task("rte"), "validation")
    message = str(error.value)
    assert "hub dataset aps/super_glue (rte), split validation" in message
    assert 'pip install "subzero_ds[hub]"' in message and "--validation_file FILE" in message


def test_missing_pyarrow_names_the_hub_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"train\.parquet is a Parquet file.*pip install \"subzero_ds\[hub\]\""):
        load_samples(get_task("rte"), "train", file=path)


def test_missing_matplotlib_names_the_plot_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in range(1, 5)))
    assert plot_main([str(metrics), "-o", str(tmp_path / "loss.png")]) == 2
    assert 'pip install "subzero_ds[plot]"' in capsys.readouterr().err
    assert not (tmp_path / "loss.png").exists()
