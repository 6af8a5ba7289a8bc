#!/usr/bin/env bash
# Several nodes from a hostfile (see hostfile.example and launch/README.md). Every node needs the same
# checkout/venv at the same path.
#
# With ssh (DeepSpeed's default, pdsh): run once, on the first node; needs passwordless ssh to every host.
#   launch/multi_node.sh launch/hostfile.example --deepspeed_config ds_configs/zero3_subzero_bf16.json ...
# Without ssh: run on every node at the same time, NODE_RANK = that node's line in the hostfile (0, 1, ...)
# and MASTER_ADDR = the address of the hostfile's first node, reachable from all of them:
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multi_node.sh hostfile --deepspeed_config ...   # on node 0
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/multi_node.sh hostfile --deepspeed_config ...   # on node 1
# On CPU (gloo) the interface the nodes share must be named, or gloo advertises 127.0.0.1 and hangs:
#   GLOO_SOCKET_IFNAME=eth1 NCCL_SOCKET_IFNAME=eth1 launch/multi_node.sh ...
# tests/distributed/test_two_nodes.py runs the no-ssh recipe on two network namespaces.
set -euo pipefail
HOSTFILE=${1:?usage: [NODE_RANK=K MASTER_ADDR=ADDR] multi_node.sh HOSTFILE [train args...]}; shift
# DeepSpeed silently falls back to a 1-node run on localhost when the hostfile is missing.
[ -f "$HOSTFILE" ] || { echo "multi_node.sh: hostfile $HOSTFILE not found" >&2; exit 2; }
NODE_ARGS=()
if [ -n "${NODE_RANK:-}" ]; then
  NODE_ARGS=(--no_ssh --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:?NODE_RANK needs MASTER_ADDR (node 0)}")
elif [ -n "${MASTER_ADDR:-}" ]; then
  NODE_ARGS=(--master_addr "$MASTER_ADDR")  # else DeepSpeed asks node 0 over ssh (`hostname -I`)
fi
exec deepspeed --hostfile "$HOSTFILE" "${NODE_ARGS[@]}" --master_port "${MASTER_PORT:-29500}" \
  --module subzero_ds.train "$@"
