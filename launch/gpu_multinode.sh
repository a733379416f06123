#!/usr/bin/env bash
# Train on several GPU nodes: one process per node, all running the same line.
# Under SLURM (`sbatch --nodes=N --ntasks-per-node=1 launch/gpu_multinode.sh ...`) JAX reads the
# SLURM variables; otherwise pass --coordinator=HOST:PORT --num_nodes=N --node_rank=R on each node.
#
#   launch/gpu_multinode.sh --config=configs/iar.py:xl --workdir=/shared/iar_xl --coordinator=node0:1234 \
#       --num_nodes=4 --node_rank=0
#   launch/gpu_multinode.sh ... --dry-run   # print the command (ready to paste) only
#   launch/gpu_multinode.sh --install ...   # first pip install -e ".[cuda12]" on this node
set -euo pipefail
CONFIG=configs/iar.py:b; WORKDIR=; DRY=0; INSTALL=0; COORD=; NNODES=; RANK=; EXTRA=(); rest=0
for a in "$@"; do
  if [[ $rest == 1 ]]; then EXTRA+=("$a"); continue; fi
  case "$a" in
    --config=*) CONFIG=${a#*=};; --workdir=*) WORKDIR=${a#*=};; --coordinator=*) COORD=${a#*=};;
    --num_nodes=*) NNODES=${a#*=};; --node_rank=*) RANK=${a#*=};; --dry-run) DRY=1;; --install) INSTALL=1;; --) rest=1;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0;;
    *) echo "unknown flag $a (see --help)" >&2; exit 2;;
  esac
done
[[ -n "$WORKDIR" ]] || { echo "--workdir is required (a path every node can reach)" >&2; exit 2; }
if [[ -z "${SLURM_NTASKS:-}" ]]; then
  [[ -n "$COORD" && -n "$NNODES" && -n "$RANK" ]] || { echo "outside SLURM pass --coordinator, --num_nodes and --node_rank" >&2; exit 2; }
  export JAX_COORDINATOR_ADDRESS=$COORD JAX_NUM_PROCESSES=$NNODES JAX_PROCESS_ID=$RANK
fi
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
CMD=(iar-jax train "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ $INSTALL == 1 ]]; then
  printf '%q ' pip install -e "$ROOT[cuda12]" | sed 's/ $//'; echo
  [[ $DRY == 1 ]] || pip install -e "$ROOT[cuda12]"
fi
# Pasteable: the variables JAX reads, then the command (under SLURM, JAX reads SLURM's own).
for v in JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID; do [[ -n "${!v:-}" ]] && printf '%s=%q ' "$v" "${!v}"; done
printf 'XLA_FLAGS=%q ' "$XLA_FLAGS"; printf '%q ' "${CMD[@]}" | sed 's/ $//'; echo
[[ $DRY == 1 ]] || exec "${CMD[@]}"
