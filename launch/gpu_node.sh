#!/usr/bin/env bash
# Train on one GPU node: one process drives all local GPUs (the mesh spans them).
#
#   launch/gpu_node.sh --config=configs/iar.py:l --workdir=/ckpt/iar_l [-- --config.train.global_batch=256]
#   launch/gpu_node.sh ... --dry-run        # print the command (ready to paste) only
#   launch/gpu_node.sh --install ...        # first pip install -e ".[cuda12]" (jax[cuda12] at the pinned jax)
set -euo pipefail
CONFIG=configs/iar.py:b; WORKDIR=; DRY=0; INSTALL=0; EXTRA=(); rest=0
for a in "$@"; do
  if [[ $rest == 1 ]]; then EXTRA+=("$a"); continue; fi
  case "$a" in
    --config=*) CONFIG=${a#*=};; --workdir=*) WORKDIR=${a#*=};; --dry-run) DRY=1;; --install) INSTALL=1;; --) rest=1;;
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0;;
    *) echo "unknown flag $a (see --help)" >&2; exit 2;;
  esac
done
[[ -n "$WORKDIR" ]] || { echo "--workdir is required" >&2; exit 2; }
CMD=(iar-jax train "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
# XLA flags that help large GPU runs (overlap collectives with compute).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ $INSTALL == 1 ]]; then
  printf '%q ' pip install -e "$ROOT[cuda12]" | sed 's/ $//'; echo
  [[ $DRY == 1 ]] || pip install -e "$ROOT[cuda12]"
fi
printf 'XLA_FLAGS=%q ' "$XLA_FLAGS"; printf '%q ' "${CMD[@]}" | sed 's/ $//'; echo  # pasteable
[[ $DRY == 1 ]] || exec "${CMD[@]}"
