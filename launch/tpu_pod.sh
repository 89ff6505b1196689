#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: installs the repo and starts the same command on every host.
#
# Each host runs one process; `initialize_distributed()` (imagerag_jax/sharding.py) sees more than one
# name in TPU_WORKER_HOSTNAMES and calls jax.distributed.initialize(), which finds the coordinator,
# process count and id from the TPU metadata. Every host reads only its own TFRecord files
# (files[process_index::process_count]: write at least one shard per host) and contributes
# global_batch_size / num_hosts examples per step.
#
# Usage: TPU_NAME=... ZONE=... [variables below] launch/tpu_pod.sh [extra flags for `main train`...]
#
# Worked example (v4-32: 4 hosts x 4 chips = 16 devices; 4-way FSDP inside a host, data across):
#   TPU_NAME=my-v4-32 ZONE=us-central2-b PROJECT=my-project \
#   CONFIG=configs/imageragturbo_sd21.py WORKDIR=gs://my-bucket/runs/rag1 \
#     launch/tpu_pod.sh --config.data_dir=gs://my-bucket/tfrecords \
#       --config.global_batch_size=64 --config.mesh='(("data",-1),("fsdp",4))'
#
# Config fields set here: --config.global_batch_size (a multiple of the device count and of the
# host count), --config.mesh, --config.data_dir; WORKDIR should be a bucket (gs://) that every
# host can write (orbax writes checkpoints from all hosts; only process 0 writes metrics).
# No credentials are handled here: gcloud uses your active login / the VMs' service account.
set -euo pipefail

TPU_NAME="${TPU_NAME:?set TPU_NAME to the TPU VM name}"
ZONE="${ZONE:?set ZONE, e.g. us-central2-b}"
PROJECT="${PROJECT:-}"                                   # empty: gcloud's default project
REPO_URL="${REPO_URL:-}"                                 # git URL to clone; empty: copy this checkout with scp
REPO_DIR="${REPO_DIR:-\$HOME/imagerag-jax}"              # where the repo lives on each host
JAX_EXTRA="${JAX_EXTRA:-tpu}"                            # setup.py extra: tpu = jax[tpu] with its libtpu
CONFIG="${CONFIG:-configs/imageragturbo_sd21.py}"
WORKDIR="${WORKDIR:?set WORKDIR, e.g. gs://bucket/runs/name}"

GCLOUD=(gcloud compute tpus tpu-vm)
FLAGS=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && FLAGS+=(--project "$PROJECT")

if [[ -z "$REPO_URL" ]]; then
  # Copy this checkout (without git metadata) to every host.
  SRC="$(cd "$(dirname "$0")/.." && pwd)"
  tar -C "$SRC" --exclude=.git -czf /tmp/imagerag_jax_src.tgz .
  "${GCLOUD[@]}" scp /tmp/imagerag_jax_src.tgz "$TPU_NAME":/tmp/ --worker=all "${FLAGS[@]}"
  FETCH="mkdir -p $REPO_DIR && tar -C $REPO_DIR -xzf /tmp/imagerag_jax_src.tgz"
else
  FETCH="[ -d $REPO_DIR/.git ] && git -C $REPO_DIR pull --ff-only || git clone $REPO_URL $REPO_DIR"
fi

EXTRA=""
for a in "$@"; do EXTRA+=" $(printf '%q' "$a")"; done

SETUP="set -euo pipefail; $FETCH; cd $REPO_DIR && python3 -m pip install -q -e '.[$JAX_EXTRA]'"
TRAIN="cd $REPO_DIR && python3 -m imagerag_jax.main train --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR")$EXTRA"

"${GCLOUD[@]}" ssh "$TPU_NAME" --worker=all "${FLAGS[@]}" --command "$SETUP"
"${GCLOUD[@]}" ssh "$TPU_NAME" --worker=all "${FLAGS[@]}" --command "$TRAIN"
