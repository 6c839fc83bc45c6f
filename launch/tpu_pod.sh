#!/usr/bin/env bash
# Runs the same pipeline command on every worker of a Cloud TPU VM pod slice.
#   launch/tpu_pod.sh TPU_NAME ZONE configs/lastfm.py [--workdir gs://BUCKET/run] [--config.x=y ...]
# Each worker needs the repository checked out at the same path (REPO, default ~/rsllm_jax)
# and installed (`pip install -e ".[gcs]"` plus jax[tpu]: gcsfs reaches gs:// run folders);
# the prepared data folder and the workdir must be readable by all workers: a gs:// bucket
# (README, "Run folders in a bucket") or a shared disk. Run the `prepare` step once, on one
# machine, before launching: the workers would otherwise all write the same data folder.
# Every worker runs one process (RSLLM_DISTRIBUTED=1: jax.distributed.initialize() finds the
# others); the mesh spans all chips (e.g. --config.mesh.preset=pod32 on a v5p-64: 32 chips on
# 8 workers, fsdp 8 × data 4), each worker reads its slice of every global batch, and only
# process 0 writes metrics. Check the layout first, without a TPU:
#   python -m rsllm_jax.compile_check --config CONFIG --topology tpu:v5p:2x4x4 --mesh pod32
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG [flags...]}
zone=${2:?zone}
config=${3:?config}
shift 3
repo=${REPO:-~/rsllm_jax}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "cd $repo && RSLLM_DISTRIBUTED=1 python -m rsllm_jax.main --config $config$args"
