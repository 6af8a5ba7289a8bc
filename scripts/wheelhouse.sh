#!/usr/bin/env bash
# Writes to DIR the wheels that install subzero_ds on an air-gapped NVIDIA GPU cluster (Linux x86-64)
# whose image has a CUDA torch, Triton, transformers and so numpy, but not DeepSpeed, pydantic, ...:
#
#   scripts/wheelhouse.sh DIR [--python 3.12] [--torch 2.6.0]       # here, with registry access
#   pip install --no-index --find-links DIR "subzero_ds[test-core]" # there, offline, next to torch
#
# DIR gets this project's wheel, a pure-Python DeepSpeed wheel (its ops JIT-build on first use) and
# every runtime dependency, plus the `test-core` extra (pytest, hypothesis) so that the GPU check can
# run the tests, for CPython --python (default: the building interpreter's version). Left out:
#   - torch, triton and the CUDA libraries (nvidia-*): the cluster's own are used.
#   - numpy (15 MiB of the 48 MiB budget): the image has it (transformers requires it) and every
#     dependency takes any numpy >= 1.17. Without it the core install is 50 MiB for CPython 3.12.
#     torch and numpy are resolved as stubs with no requirements, `torch==<--torch>+stub` (default:
#     the building interpreter's torch; pass the cluster's) and `numpy==<--numpy>+stub` (default
#     1.26.4, the last 1.x, so that no numpy-2-only release is chosen).
#   - mpi4py (extra `mpi`): an sdist that has to build against the cluster's MPI headers; there,
#     `pip install mpi4py` from a downloaded sdist, or use the site's own.
#   - the extras `hub` (datasets, pyarrow, pandas) and `plot` (matplotlib, pillow): pyarrow alone is
#     ~40 MB. Without them, training on local JSONL/JSON/TSV/CSV data works; hub datasets, Parquet
#     files and subzero-plot say which extra they need.
# nvidia-ml-py is included: it is DeepSpeed's pure-Python NVML binding (free GPU memory), not a CUDA
# library. The total must stay under 48 MiB; the script prints it and fails above.
#
# Runs on Linux x86-64 (pip evaluates dependency markers for the machine it runs on) with PYTHON
# (default: the project's .venv, made by scripts/setup.sh), which needs torch, setuptools and the
# DeepSpeed release to package installed: it builds the DeepSpeed and subzero_ds wheels without build
# isolation, which would otherwise pull a CUDA torch. DeepSpeed is built with DS_ACCELERATOR=cuda: its
# setup.py then records accelerator_name='cuda' and requires nvidia-ml-py, as a build on the cluster
# would (built here it would say 'cpu' and drop nvidia-ml-py); with DS_BUILD_OPS=0 nothing is
# compiled, so no CUDA is needed. For another --python the dependencies are resolved by `python3.X`
# on PATH when there is one, else by PYTHON with --python-version, which evaluates markers such as
# python_version < "3.12" for PYTHON's version (a warning says so).
set -euo pipefail

BUDGET_MIB=48
PLATFORMS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64)
DEFAULT_NUMPY=1.26.4

usage() {
  cat <<EOF
usage: scripts/wheelhouse.sh DIR [--python X.Y] [--torch VERSION] [--numpy VERSION]

Write to DIR (new or empty) the wheels of subzero_ds and its runtime dependencies, without torch,
triton, the CUDA libraries and numpy, for Linux x86-64 and CPython X.Y; then, offline, next to torch:
  pip install --no-index --find-links DIR "subzero_ds[test-core]"

  --python X.Y       the cluster's Python, e.g. 3.12 (default: PYTHON's version)
  --torch VERSION    the cluster's torch, e.g. 2.6.0 (default: PYTHON's torch)
  --numpy VERSION    the oldest numpy to resolve for (default: $DEFAULT_NUMPY)
  PYTHON=...         the building interpreter (default: .venv/bin/python; needs torch, setuptools, deepspeed)
EOF
}

bad_usage() {
  echo "wheelhouse: $1" >&2
  usage >&2
  exit 2
}

fail() {
  echo "wheelhouse: error: $1" >&2
  exit 1
}

release() {  # $1 the option, $2 its value: a plain release such as 2.6.0
  [[ $2 =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]] || bad_usage "$1 takes a release such as 2.6.0 (no +cu124 suffix), got '$2'"
}

dir="" target_python="" torch_version="" numpy_version=$DEFAULT_NUMPY
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --python | --torch | --numpy)
      [ $# -ge 2 ] || bad_usage "$1 needs a version"
      case "$1" in
        --python) [[ $2 =~ ^3\.[0-9]+$ ]] || bad_usage "--python takes MAJOR.MINOR, e.g. 3.12, got '$2'"; target_python=$2 ;;
        --torch) release "$1" "$2"; torch_version=$2 ;;
        --numpy) release "$1" "$2"; numpy_version=$2 ;;
      esac
      shift 2 ;;
    -*) bad_usage "unknown option $1" ;;
    *) [ -z "$dir" ] || bad_usage "one DIR only, got '$dir' and '$1'"; dir=$1; shift ;;
  esac
done
[ -n "$dir" ] || bad_usage "missing DIR"

repo=$(cd "$(dirname "$0")/.." && pwd)
[ "$(uname -s) $(uname -m)" = "Linux x86_64" ] \
  || fail "run this on Linux x86-64, the cluster's platform: pip evaluates dependency markers for the machine it runs on"
PYTHON=${PYTHON:-$repo/.venv/bin/python}
command -v "$PYTHON" >/dev/null || fail "no interpreter $PYTHON: run scripts/setup.sh first, or set PYTHON"

# What the building interpreter has: its version, its torch (the default --torch), the DeepSpeed
# release the project is tested with, and setuptools, which builds both wheels without isolation.
builder=$("$PYTHON" -c '
import importlib.metadata as metadata, sys

def version(name):
    try:
        return metadata.version(name).split("+")[0]
    except metadata.PackageNotFoundError:
        return "-"

print(f"{sys.version_info.major}.{sys.version_info.minor}", version("torch"), version("deepspeed"), version("setuptools"))
') || fail "$PYTHON did not run"
read -r builder_python builder_torch deepspeed_version builder_setuptools <<<"$builder"
[ "$builder_setuptools" != "-" ] || fail "$PYTHON has no setuptools: $PYTHON -m pip install setuptools"
[ "$builder_torch" != "-" ] \
  || fail "$PYTHON has no torch, which builds DeepSpeed: $PYTHON -m pip install torch==2.13.0 (the CPU wheel), or run scripts/setup.sh"
[ "$deepspeed_version" != "-" ] || fail "$PYTHON has no deepspeed, whose release is the one packaged: run scripts/setup.sh"
target_python=${target_python:-$builder_python}
torch_version=${torch_version:-$builder_torch}

if [ -e "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
  fail "$dir is not empty: pass a new or empty folder (wheels for another Python would mix in)"
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# Who resolves: an interpreter of the target version evaluates markers right; PYTHON approximates.
resolver=$PYTHON
if [ "$target_python" != "$builder_python" ]; then
  if command -v "python$target_python" >/dev/null && "python$target_python" -m pip --version >/dev/null 2>&1; then
    resolver=$(command -v "python$target_python")
  else
    echo "wheelhouse: warning: no python$target_python with pip on PATH; resolving with Python $builder_python," \
         "so dependencies under a python_version marker follow $builder_python, not $target_python" >&2
  fi
fi

echo "wheelhouse: subzero_ds from $repo"
# Built from a copy: an in-tree setuptools build would leave build/ in the working tree.
mkdir "$scratch/src"
(cd "$repo" && tar --exclude=__pycache__ -cf - pyproject.toml README.md subzero_ds \
   $(ls setup.py setup.cfg MANIFEST.in 2>/dev/null)) | tar -xf - -C "$scratch/src"
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "$scratch/src"
project_wheel=$(ls "$dir"/subzero_ds-*.whl)

echo "wheelhouse: deepspeed==$deepspeed_version, built from its sdist (DS_BUILD_OPS=0 DS_ACCELERATOR=cuda)"
# --no-binary: always this build; --no-cache-dir: never a wheel cached from a CPU build ('cpu', no nvidia-ml-py).
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir \
  --no-binary deepspeed -w "$dir" "deepspeed==$deepspeed_version"

echo "wheelhouse: dependencies for CPython $target_python, Linux x86-64, next to torch $torch_version" \
     "and numpy >= $numpy_version (resolved by $resolver)"
"$PYTHON" - "$scratch/stub" "torch==$torch_version" "numpy==$numpy_version" <<'EOF'
# Wheels named torch and numpy with no requirements: they satisfy `torch>=...` and `numpy>=...` as the
# cluster's installed ones will, and nothing of theirs is downloaded.
import pathlib, sys, zipfile

folder = pathlib.Path(sys.argv[1])
folder.mkdir()
for pin in sys.argv[2:]:
    name, version = pin.split("==")
    info = f"{name}-{version}+stub.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}+stub\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: wheelhouse.sh\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / f"{name}-{version}+stub-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
EOF
platform_args=()
for platform in "${PLATFORMS[@]}"; do platform_args+=(--platform "$platform"); done
"$resolver" -m pip download -q -d "$dir" --only-binary=:all: "${platform_args[@]}" \
  --python-version "$target_python" --implementation cp \
  --find-links "$scratch/stub" --find-links "$dir" \
  "$project_wheel[test-core]" "deepspeed==$deepspeed_version" "torch==$torch_version+stub" "numpy==$numpy_version+stub"
rm -f "$dir"/*+stub-py3-none-any.whl

for wheel in "$dir"/*.whl; do
  case $(basename "$wheel") in
    nvidia_ml_py-*) ;;
    torch-* | triton-* | nvidia_* | numpy-*) fail "$(basename "$wheel") reached $dir: the cluster's own is used" ;;
  esac
done

mib() { awk -v bytes="$1" 'BEGIN { printf "%.1f", bytes / 1048576 }'; }
total=$(du -cb "$dir"/*.whl | tail -n 1 | cut -f 1)
echo "wheelhouse: the biggest wheels:"
ls -S "$dir" | head -n 5 | while read -r name; do
  printf '  %6s MiB  %s\n' "$(mib "$(stat -c %s "$dir/$name")")" "$name"
done
echo "wheelhouse: $(ls "$dir"/*.whl | wc -l) wheels, $(mib "$total") MiB in all, in $dir"
if [ "$total" -ge $((BUDGET_MIB * 1048576)) ]; then
  fail "$(mib "$total") MiB is over the budget of $BUDGET_MIB MiB: make the biggest dependencies above optional (extras in pyproject.toml)"
fi
echo "wheelhouse: offline, next to torch and numpy: pip install --no-index --find-links $dir \"subzero_ds[test-core]\""
