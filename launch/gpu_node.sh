#!/usr/bin/env bash
# Train on one GPU node: one process drives all local GPUs (the mesh spans them).
#
#   launch/gpu_node.sh --config=configs/iar.py:l --workdir=/ckpt/iar_l [-- --config.train.global_batch=256]
#   launch/gpu_node.sh ... --dry-run
set -euo pipefail
CONFIG=configs/iar.py:b; WORKDIR=; DRY=0; EXTRA=(); rest=0
for a in "$@"; do
  if [[ $rest == 1 ]]; then EXTRA+=("$a"); continue; fi
  case "$a" in
    --config=*) CONFIG=${a#*=};; --workdir=*) WORKDIR=${a#*=};; --dry-run) DRY=1;; --) rest=1;;
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0;;
    *) echo "unknown flag $a (see --help)" >&2; exit 2;;
  esac
done
[[ -n "$WORKDIR" ]] || { echo "--workdir is required" >&2; exit 2; }
CMD=(iar-jax train "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
# XLA flags that help large GPU runs (overlap collectives with compute).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
echo "+ XLA_FLAGS='$XLA_FLAGS' ${CMD[*]}"
[[ $DRY == 1 ]] || exec "${CMD[@]}"
