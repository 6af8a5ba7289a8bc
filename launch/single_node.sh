#!/usr/bin/env bash
# One node, N ranks (one per GPU; on a CPU-only machine DeepSpeed picks its CPU accelerator and gloo).
#   launch/single_node.sh 8 --deepspeed_config ds_configs/zero3_subzero_bf16.json --model_name_or_path facebook/opt-13b
set -euo pipefail
NUM_RANKS=${1:-2}; shift || true
exec deepspeed --num_gpus "$NUM_RANKS" --module subzero_ds.train "$@"
