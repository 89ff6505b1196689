#!/usr/bin/env bash
# Train on this machine (one process; all local devices: CPU, one or more GPUs, or a TPU VM).
#
# Usage: launch/local.sh [CONFIG] [WORKDIR] [extra flags passed to `main train`...]
#   CONFIG   ml_collections config file, optionally with its arg string (default configs/tiny.py)
#   WORKDIR  checkpoints, metrics and samples; rerunning the same command resumes (default /tmp/imagerag_tiny)
#
# Worked example (tiny random-weight run, 100 steps, batch 8, 2-way FSDP on 8 fake CPU devices):
#   XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
#     launch/local.sh configs/tiny.py /tmp/imagerag_tiny \
#     --config.total_steps=100 --config.global_batch_size=8 --config.mesh='(("data",-1),("fsdp",2))'
#
# Config fields commonly set here: --config.total_steps, --config.global_batch_size (a multiple of
# the mesh's batch shards), --config.mesh (('data', N), ('fsdp', M); -1 = the rest),
# --config.data_dir (unset: synthetic data in WORKDIR/data), --config.student_weights / teacher_weights.
set -euo pipefail

CONFIG="${1:-configs/tiny.py}"
WORKDIR="${2:-/tmp/imagerag_tiny}"
shift $(( $# >= 2 ? 2 : $# ))
PYTHON="${PYTHON:-python3}"

cd "$(dirname "$0")/.."
exec "$PYTHON" -m imagerag_jax.main train --config "$CONFIG" --workdir "$WORKDIR" "$@"
