#!/usr/bin/env bash
# MPI launch (Open MPI): DeepSpeed discovers rank/world size through mpi4py (pip install "subzero_ds[mpi]").
#   launch/mpirun.sh 2 --deepspeed_config ds_configs/zero3_subzero.json                  # one node
#   HOSTFILE=hosts IFNAME=eth1 launch/mpirun.sh 16 --deepspeed_config ...                 # several nodes
#   HOSTS=node1:8,node2:8 IFNAME=eth1 launch/mpirun.sh 16 --deepspeed_config ...          # same, inline
# Open MPI's hostfile reads "node1 slots=8" like DeepSpeed's. mpirun starts its daemons on the other
# nodes over ssh (or --mca plm_rsh_agent); node hostnames must differ (local ranks are counted by hostname).
# IFNAME pins gloo/NCCL and Open MPI's own traffic to the interface the nodes share.
# tests/distributed/test_two_nodes.py runs this recipe on two network namespaces (see launch/README.md).
set -euo pipefail
NUM_RANKS=${1:-2}; shift || true
ARGS=()
[ "$(id -u)" = 0 ] && ARGS+=(--allow-run-as-root)
[ -n "${HOSTFILE:-}" ] && ARGS+=(--hostfile "$HOSTFILE")
[ -n "${HOSTS:-}" ] && ARGS+=(--host "$HOSTS")
if [ -n "${IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME=$IFNAME NCCL_SOCKET_IFNAME=$IFNAME
  ARGS+=(--mca oob_tcp_if_include "$IFNAME" --mca btl_tcp_if_include "$IFNAME"
         -x GLOO_SOCKET_IFNAME -x NCCL_SOCKET_IFNAME)
fi
exec mpirun "${ARGS[@]}" -np "$NUM_RANKS" -x PATH python -m subzero_ds.train "$@"
