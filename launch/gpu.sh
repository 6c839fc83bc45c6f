#!/usr/bin/env bash
# Runs the pipeline on GPU hosts: one process per host, seeing all of the host's GPUs.
#   launch/gpu.sh configs/lastfm.py [--workdir DIR] [--config.x=y ...]
# One host: run it as is (all local GPUs in one process; pick the layout with
# --config.mesh.preset=..., default: FSDP over every GPU). Several hosts: run it on every host
# with the same arguments and
#   COORDINATOR=host0:1234 NUM_HOSTS=N HOST_ID=i launch/gpu.sh ...
# (HOST_ID 0 on the coordinator); the processes then form one mesh over all GPUs, each reads
# its slice of every global batch, and only process 0 writes metrics. The prepared data and the
# workdir must be on a filesystem every host sees.
set -euo pipefail
config=${1:?usage: launch/gpu.sh CONFIG [flags...]}
shift
# Let XLA take GPU memory as it needs it instead of preallocating 75 % up front, so a second
# process (evaluation, a notebook) can share the card.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
if [[ -n "${COORDINATOR:-}" ]]; then
  export JAX_COORDINATOR_ADDRESS=$COORDINATOR
  export JAX_NUM_PROCESSES=${NUM_HOSTS:?NUM_HOSTS}
  export JAX_PROCESS_ID=${HOST_ID:?HOST_ID}
fi
exec python -m rsllm_jax.main --config "$config" "$@"
