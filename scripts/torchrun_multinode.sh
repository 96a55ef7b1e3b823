#!/usr/bin/env bash
# Launch `python -m mvlm <command> [args...]` with torchrun on this node; run it once per node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#       scripts/torchrun_multinode.sh sft --model Qwen/Qwen2.5-VL-3B-Instruct --dataset data.jsonl ...
#
# Variables (ms-swift's names; every one has a one-node default):
#   NNODES          number of nodes                              (default 1)
#   NODE_RANK       this node's index, 0..NNODES-1                (default 0)
#   MASTER_ADDR     address of node 0, reachable from every node (default 127.0.0.1)
#   MASTER_PORT     a free TCP port on node 0                      (default 29500)
#   NPROC_PER_NODE  ranks on this node                             (default: #GPUs, or 1 without one)
#   MVLM_GRACE_SECONDS  seconds torchrun waits for ranks to save after SIGTERM/SIGUSR1 before it
#                   SIGKILLs them (default 110: fits under `#SBATCH --signal=B:USR1@120`)
#   MVLM_PYTHON     interpreter (default: python, else python3)
#   MVLM_TORCHRUN_ARGS  extra torchrun flags, split on spaces (e.g. "--max-restarts 0")
#
# One node (NNODES=1) uses torchrun --standalone, so MASTER_ADDR/MASTER_PORT are not needed.
# The exit status is torchrun's (0 when every rank exited 0). A rank that stopped on a signal
# exits 143 (mvlm.train.signals.EXIT_PREEMPTED) after saving; torchrun then reports a failure
# and this script returns non-zero -- the SLURM templates tell preemption apart by their own trap.
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,22p' "$0"
  [ $# -ge 1 ] && exit 0
  exit 2
fi

PY=${MVLM_PYTHON:-}
if [ -z "$PY" ]; then
  if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null \
                   || echo 1)
fi

for v in NNODES NODE_RANK MASTER_PORT NPROC_PER_NODE; do
  if ! [[ ${!v} =~ ^[0-9]+$ ]]; then
    echo "torchrun_multinode.sh: $v must be a non-negative integer, got '${!v}'" >&2
    exit 2
  fi
done
if [ "$NODE_RANK" -ge "$NNODES" ]; then
  echo "torchrun_multinode.sh: NODE_RANK=$NODE_RANK must be < NNODES=$NNODES" >&2
  exit 2
fi
if [ "$NPROC_PER_NODE" -lt 1 ]; then
  echo "torchrun_multinode.sh: NPROC_PER_NODE must be >= 1" >&2
  exit 2
fi

# Megatron-Core wants one CUDA stream for comm/compute ordering (TP/SP overlap).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# One intra-op thread per rank unless told otherwise (torchrun does this too, with a warning).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# torchrun flags through their PET_* environment form: newer torchrun forwards SIGUSR1 (the SLURM
# pre-timeout signal) to the ranks and waits the grace time before SIGKILL; older ones ignore these.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-${MVLM_GRACE_SECONDS:-110}}

if [ "$NNODES" -eq 1 ]; then
  RDZV=(--standalone)
else
  RDZV=(--nnodes "$NNODES" --node-rank "$NODE_RANK"
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi
# shellcheck disable=SC2206 # word splitting of the extra flags is the point
EXTRA=(${MVLM_TORCHRUN_ARGS:-})

set -x
exec "$PY" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node "$NPROC_PER_NODE" \
  "${EXTRA[@]}" -m mvlm "$@"
