#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create it, install iar-jax on every worker, launch the same
# `iar-jax train` line on all workers (JAX discovers the pod and calls jax.distributed.initialize()).
#
#   launch/tpu_pod.sh --name=iar --zone=us-central2-b --type=v4-64 --config=configs/iar.py:xl \
#       --workdir=gs://bucket/iar_xl -- --config.data.path=gs://bucket/codes
#   launch/tpu_pod.sh ... --dry-run      # print the commands only
set -euo pipefail
NAME=iar; ZONE=us-central2-b; TYPE=v4-8; VERSION=tpu-ubuntu2204-base; CONFIG=configs/iar.py:b
WORKDIR=; REPO=https://github.com/your-org/iar-jax.git; DRY=0; CREATE=1; EXTRA=()
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; echo "flags: --name --zone --type --version --config --workdir --repo --no-create --dry-run [-- extra train flags]"; }
for a in "$@"; do
  case "$a" in
    --name=*) NAME=${a#*=};; --zone=*) ZONE=${a#*=};; --type=*) TYPE=${a#*=};; --version=*) VERSION=${a#*=};;
    --config=*) CONFIG=${a#*=};; --workdir=*) WORKDIR=${a#*=};; --repo=*) REPO=${a#*=};;
    --no-create) CREATE=0;; --dry-run) DRY=1;; -h|--help) usage; exit 0;;
    --) shift_rest=1;; *) if [[ ${shift_rest:-0} == 1 ]]; then EXTRA+=("$a"); else echo "unknown flag $a" >&2; usage; exit 2; fi;;
  esac
done
[[ -n "$WORKDIR" ]] || { echo "--workdir is required (a gs:// path every worker can reach)" >&2; exit 2; }
run() { echo "+ $*"; [[ $DRY == 1 ]] || "$@"; }
if [[ $CREATE == 1 ]]; then
  run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" --version="$VERSION"
fi
SETUP="git clone $REPO iar-jax 2>/dev/null || (cd iar-jax && git pull); cd iar-jax && pip install -e . 'jax[tpu]'"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$SETUP"
TRAIN="cd iar-jax && iar-jax train --config=$CONFIG --workdir=$WORKDIR ${EXTRA[*]:-}"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$TRAIN"
