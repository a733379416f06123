#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create it, install iar-jax[tpu] (jax[tpu] at the pinned jax
# version) on every worker, launch the same `iar-jax train` line on all workers (JAX discovers the
# pod and calls jax.distributed.initialize()).
#
#   launch/tpu_pod.sh --repo=https://github.com/YOU/iar-jax.git --name=iar --zone=us-central2-b \
#       --type=v4-64 --config=configs/iar.py:xl --workdir=gs://bucket/iar_xl -- --config.data.path=gs://bucket/codes
#   launch/tpu_pod.sh ... --dry-run      # print the commands (ready to paste into a shell) only
#
# --repo (or IAR_JAX_REPO) is the git URL of your copy of this repository: required.
set -euo pipefail
NAME=iar; ZONE=us-central2-b; TYPE=v4-8; VERSION=tpu-ubuntu2204-base; CONFIG=configs/iar.py:b
WORKDIR=; REPO=${IAR_JAX_REPO:-}; DRY=0; CREATE=1; EXTRA=(); rest=0
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; echo "flags: --repo --name --zone --type --version --config --workdir --no-create --dry-run [-- extra train flags]"; }
for a in "$@"; do
  if [[ $rest == 1 ]]; then EXTRA+=("$a"); continue; fi
  case "$a" in
    --name=*) NAME=${a#*=};; --zone=*) ZONE=${a#*=};; --type=*) TYPE=${a#*=};; --version=*) VERSION=${a#*=};;
    --config=*) CONFIG=${a#*=};; --workdir=*) WORKDIR=${a#*=};; --repo=*) REPO=${a#*=};;
    --no-create) CREATE=0;; --dry-run) DRY=1;; -h|--help) usage; exit 0;; --) rest=1;;
    *) echo "unknown flag $a" >&2; usage; exit 2;;
  esac
done
[[ -n "$REPO" ]] || { echo "--repo=GIT_URL (or IAR_JAX_REPO) is required: the repository every worker clones" >&2; exit 2; }
[[ -n "$WORKDIR" ]] || { echo "--workdir is required (a gs:// path every worker can reach)" >&2; exit 2; }
# Commands are printed shell-quoted, so --dry-run output can be pasted as is.
run() { printf '%q ' "$@" | sed 's/ $//'; echo; [[ $DRY == 1 ]] || "$@"; }
q() { printf '%q ' "$@" | sed 's/ $//'; }
if [[ $CREATE == 1 ]]; then
  run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" --version="$VERSION"
fi
SETUP="(git clone $(q "$REPO") iar-jax 2>/dev/null || git -C iar-jax pull) && cd iar-jax && pip install -e '.[tpu]'"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$SETUP"
TRAIN="cd iar-jax && $(q iar-jax train "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$TRAIN"
