#!/usr/bin/env bash
# Run a job on a Cloud TPU VM pod slice (train by default): installs the repo and starts the same
# command on every host.
#
# Each host runs one process; `initialize_distributed()` (imagerag_jax/sharding.py) sees more than one
# name in TPU_WORKER_HOSTNAMES and calls jax.distributed.initialize(), which finds the coordinator,
# process count and id from the TPU metadata. Every host reads only its own TFRecord files
# (files[process_index::process_count]: write at least one shard per host) and contributes
# global_batch_size / num_hosts examples per step.
#
# Usage: TPU_NAME=... ZONE=... [variables below] launch/tpu_pod.sh [extra flags for `main $JOB`...]
#
# JOB (default train) is any of the jobs every host takes part in: build-db (each host encodes its
# parts of the database; with --config.db.dir=gs://... the hosts exchange them through the bucket),
# precompute (each host writes its own TFRecord shards to --config.data_dir, gs:// included), train,
# and evaluate (each host generates its slice of the prompts into --out, gs:// included; evaluate
# takes no --config/--workdir: pass its flags, e.g. --run gs://B/run --prompts ... --out gs://B/eval).
# The offline jobs, in order, for the paper's mixture (synthetic teacher pairs, then real pairs):
#   JOB=build-db   WORKDIR=gs://B/w CONFIG='configs/precompute_webdataset.py:paths=/data/db/*.tar' \
#     launch/tpu_pod.sh --config.db.dir=gs://B/db --config.index_dir=gs://B/index --config.encoder_weights=$SD
#   JOB=precompute WORKDIR=gs://B/w CONFIG='configs/precompute_webdataset.py:paths=...,train_paths=...,teacher' \
#     launch/tpu_pod.sh --config.db.dir=gs://B/db --config.index_dir=gs://B/index \
#       --config.data_dir=gs://B/synthetic --config.encoder_weights=$SD --config.teacher_weights=$SD21
#   (the same without ",teacher" and with --config.data_dir=gs://B/real for the real pairs; then
#   train with --config.data_mixture="(('gs://B/synthetic', 0.5), ('gs://B/real', 0.5))").
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
JOB="${JOB:-train}"                                      # build-db | precompute | train | evaluate
CONFIG="${CONFIG:-configs/imageragturbo_sd21.py}"
case "$JOB" in
  build-db|precompute|train) WORKDIR="${WORKDIR:?set WORKDIR, e.g. gs://bucket/runs/name}" ;;
  evaluate) ;;
  *) echo "error: JOB must be build-db, precompute, train or evaluate, not '$JOB'" >&2; exit 2 ;;
esac

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
if [[ "$JOB" == evaluate ]]; then
  RUN="cd $REPO_DIR && python3 -m imagerag_jax.main evaluate$EXTRA"
else
  RUN="cd $REPO_DIR && python3 -m imagerag_jax.main $JOB --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR")$EXTRA"
fi

"${GCLOUD[@]}" ssh "$TPU_NAME" --worker=all "${FLAGS[@]}" --command "$SETUP"
"${GCLOUD[@]}" ssh "$TPU_NAME" --worker=all "${FLAGS[@]}" --command "$RUN"
