#!/usr/bin/env bash
# Several nodes from a hostfile (see hostfile.example): DeepSpeed reaches the other nodes with pdsh/ssh.
# Run on the first node; every node needs the same checkout/venv at the same path and passwordless ssh.
#   launch/multi_node.sh launch/hostfile.example --deepspeed_config ds_configs/zero3_subzero_bf16.json ...
# Without ssh, run on each node instead (K = 0, 1, ...; MASTER = node 0's address):
#   deepspeed --hostfile H --no_ssh --node_rank K --master_addr MASTER --module subzero_ds.train ...
# On machines with several interfaces, pin gloo's/NCCL's to the one the nodes share:
#   GLOO_SOCKET_IFNAME=eth1 NCCL_SOCKET_IFNAME=eth1 launch/multi_node.sh ...
set -euo pipefail
HOSTFILE=${1:?usage: multi_node.sh HOSTFILE [train args...]}; shift
exec deepspeed --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" --module subzero_ds.train "$@"
