#!/usr/bin/env bash
# Runs the pipeline on one GPU host.
#   launch/gpu.sh configs/lastfm.py [--workdir DIR] [--config.x=y ...]
set -euo pipefail
config=${1:?usage: launch/gpu.sh CONFIG [flags...]}
shift
# Let XLA take GPU memory as it needs it instead of preallocating 75 % up front, so a second
# process (evaluation, a notebook) can share the card.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec python -m rsllm_jax.main --config "$config" "$@"
