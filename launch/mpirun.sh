#!/usr/bin/env bash
# MPI launch: DeepSpeed discovers rank/world size through mpi4py (pip install "subzero_ds[mpi]").
#   launch/mpirun.sh 2 --deepspeed_config ds_configs/zero3_subzero.json       # one node
#   HOSTS=node1:8,node2:8 launch/mpirun.sh 16 ...                             # several nodes
set -euo pipefail
NUM_RANKS=${1:-2}; shift || true
HOST_ARGS=()
[ -n "${HOSTS:-}" ] && HOST_ARGS=(--host "$HOSTS")
ROOT_ARGS=()
[ "$(id -u)" = 0 ] && ROOT_ARGS=(--allow-run-as-root)
exec mpirun "${ROOT_ARGS[@]}" "${HOST_ARGS[@]}" -np "$NUM_RANKS" -x PATH -x MASTER_PORT="${MASTER_PORT:-29500}" \
  python -m subzero_ds.train "$@"
