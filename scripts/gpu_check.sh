#!/usr/bin/env bash
# The prepared GPU check: on a machine with >= 1 NVIDIA GPU and a CUDA torch already installed,
# offline, prove the GPU path of this checkout in one command (under 8 minutes on one GPU):
#
#   scripts/gpu_check.sh [DIR]        # DIR: a wheelhouse from scripts/wheelhouse.sh (omit if installed)
#
# 1. installs DIR's wheels into a throw-away virtual environment that sees the system's packages
#    (--system-site-packages: the image's CUDA torch, Triton, numpy are used, never replaced);
# 2. runs the `gpu`-marked tests (tests/gpu: placement, CPU/GPU direction bits, persistent copies,
#    bf16 lr = 0, fused = in-place, CPU offload, 1 = 2 GPUs under NCCL with >= 2 GPUs, and the
#    subzero-train CLI on 1 and 2 GPUs under ZeRO-3);
# 3. runs the step-cost benchmark on an OPT-1.3B-shaped model in bf16 at 16 x 128 tokens: ZO step
#    / two plain forwards (SubZero and MeZO, in-place and fused), the ZO arithmetic per step, a
#    first-order AdamW ZeRO-3 step (torch_adam: no DeepSpeed CUDA op is compiled) and the peak GPU
#    memory of each.
# It writes one Markdown report (REPORT, default gpu_check/report.md; $OUT/report.md when OUT is
# set), prints the first failure as soon as it happens, and keeps going with the rest. The exit
# status is 1 if any step failed. Without a GPU it says so and exits 0 having run nothing.
set -uo pipefail

usage() {
  echo "usage: scripts/gpu_check.sh [WHEELHOUSE_DIR]   (PYTHON=python3, REPORT=gpu_check/report.md)" >&2
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  -*) usage; exit 2 ;;
esac
[ $# -le 1 ] || { usage; exit 2; }
wheelhouse=${1:-}
repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}

gpus=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
fi
if [ "${gpus:-0}" -lt 1 ]; then
  echo "gpu_check: no NVIDIA GPU is usable here (nvidia-smi and a CUDA torch in $PYTHON are needed); nothing was run."
  exit 0
fi

default_report=gpu_check/report.md
[ -n "${OUT:-}" ] && default_report=$OUT/report.md
report=${REPORT:-$repo/$default_report}
mkdir -p "$(dirname "$report")"
logs=$(dirname "$report")/logs
mkdir -p "$logs"
started=$(date +%s)
first_failure=""

{
  echo "# GPU check of subzero_ds"
  echo
  echo "Commit \`$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)\`$(git -C "$repo" diff --quiet 2>/dev/null || echo ' (with uncommitted changes)'), $(date -u '+%Y-%m-%d %H:%M UTC')."
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  echo '```'
} >"$report"

# step NAME TIMEOUT_S COMMAND...: run it, log it, add a row to the report; keep going on failure.
step() {
  local name=$1 limit=$2
  shift 2
  local log="$logs/${name// /_}.log" begin status
  begin=$(date +%s)
  echo "gpu_check: $name ..."
  timeout "$limit" "$@" >"$log" 2>&1
  status=$?
  local seconds=$(($(date +%s) - begin))
  if [ $status -eq 0 ]; then
    echo "gpu_check: $name passed (${seconds} s)"
    printf '\n## %s: passed (%s s)\n' "$name" "$seconds" >>"$report"
  else
    [ $status -eq 124 ] && echo "(stopped after $limit s)" >>"$log"
    echo "gpu_check: FAILED: $name (exit $status after ${seconds} s); the end of its log ($log):" >&2
    tail -n 40 "$log" >&2
    [ -n "$first_failure" ] || first_failure=$name
    { printf '\n## %s: FAILED (exit %s, %s s)\n\n```\n' "$name" "$status" "$seconds"; tail -n 60 "$log"; echo '```'; } >>"$report"
  fi
  return 0
}

# 1. The environment: the system's torch, this project's dependencies from the wheelhouse.
python=$PYTHON
if [ -n "$wheelhouse" ]; then
  prefix=$(mktemp -d)/venv
  step "install from $wheelhouse" 300 bash -c "'$PYTHON' -m venv --system-site-packages '$prefix' && \
    '$prefix/bin/python' -m pip install -q --no-index --find-links '$wheelhouse' 'subzero_ds[test-core]'"
  python=$prefix/bin/python
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever the wheel held
export PATH="$(dirname "$python"):$PATH"  # its deepspeed launcher
step "environment" 120 "$python" -c "
import torch, deepspeed, subzero_ds, triton
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name())
print('deepspeed', deepspeed.__version__, 'triton', triton.__version__, 'subzero_ds', subzero_ds.__file__)"
{ echo; echo '```'; cat "$logs/environment.log"; echo '```'; } >>"$report"

# 2. The gpu-marked tests.
step "gpu tests" 330 "$python" -m pytest "$repo/tests/gpu" -v -rs -p no:cacheprovider
grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" "$logs/gpu_tests.log" | sed 's/^/    /' >>"$report"

# 3. The step-cost benchmark on an OPT-1.3B shape (1 GPU).
bench_report=$(dirname "$report")/step_cost_opt-1.3b_bf16.md
step "step cost OPT-1.3B bf16" 330 deepspeed --num_gpus 1 "$repo/bench/step_cost.py" --model opt-1.3b --dtype bf16 \
  --method subzero mezo first-order --mode in-place fused --batch-size 16 --seq-len 128 --steps 3 --warmup 1 \
  --max-other-load 1.0 --output "$bench_report"
[ -f "$bench_report" ] && { echo; sed 's/^#/##/' "$bench_report"; } >>"$report"

total=$(($(date +%s) - started))
if [ -n "$first_failure" ]; then
  printf '\nFirst failure: **%s**. Total %s s.\n' "$first_failure" "$total" >>"$report"
  echo "gpu_check: done in $total s; FIRST FAILURE: $first_failure; report: $report" >&2
  exit 1
fi
printf '\nEverything passed. Total %s s.\n' "$total" >>"$report"
echo "gpu_check: everything passed in $total s; report: $report"
