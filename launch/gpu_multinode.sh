#!/usr/bin/env bash
# Train on several GPU nodes: one process per node, all running the same line.
# Under SLURM (`sbatch --nodes=N --ntasks-per-node=1 launch/gpu_multinode.sh ...`) JAX reads the
# SLURM variables; otherwise pass --coordinator=HOST:PORT --num_nodes=N --node_rank=R on each node.
#
#   launch/gpu_multinode.sh --config=configs/iar.py:xl --workdir=/shared/iar_xl --coordinator=node0:1234 \
#       --num_nodes=4 --node_rank=0
#   launch/gpu_multinode.sh ... --dry-run
set -euo pipefail
CONFIG=configs/iar.py:b; WORKDIR=; DRY=0; COORD=; NNODES=; RANK=; EXTRA=(); rest=0
for a in "$@"; do
  if [[ $rest == 1 ]]; then EXTRA+=("$a"); continue; fi
  case "$a" in
    --config=*) CONFIG=${a#*=};; --workdir=*) WORKDIR=${a#*=};; --coordinator=*) COORD=${a#*=};;
    --num_nodes=*) NNODES=${a#*=};; --node_rank=*) RANK=${a#*=};; --dry-run) DRY=1;; --) rest=1;;
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
echo "+ JAX_COORDINATOR_ADDRESS=${JAX_COORDINATOR_ADDRESS:-<slurm>} JAX_PROCESS_ID=${JAX_PROCESS_ID:-<slurm>} ${CMD[*]}"
[[ $DRY == 1 ]] || exec "${CMD[@]}"
