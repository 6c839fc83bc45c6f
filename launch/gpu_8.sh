#!/usr/bin/env bash
# Runs the pipeline on one host with 8 GPUs: one process drives all 8 (no distributed start-up
# needed), with the batch and every parameter sharded 8 ways (mesh preset fsdp8).
#   launch/gpu_8.sh configs/lastfm.py [--workdir DIR] [--config.x=y ...]
# Other layouts: --config.mesh.preset=data8 (a base model that fits one GPU: plain data
# parallelism) or --config.mesh.preset=data2_tensor4 (tensor parallelism over NVLink; needs the
# model's num_kv_heads divisible by 4). config.train.batch_size must be divisible by 8.
set -euo pipefail
config=${1:?usage: launch/gpu_8.sh CONFIG [flags...]}
shift
here=$(cd "$(dirname "$0")" && pwd)
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1,2,3,4,5,6,7}
exec "$here/gpu.sh" "$config" --config.mesh.preset=fsdp8 "$@"
