# shellcheck shell=bash
# Shared by the sbatch templates in this directory (sourced, not run). Provides:
#
#   mvlm_slurm_setup             rendezvous (MASTER_ADDR = first host of the job, MASTER_PORT from
#                                the job id), NNODES, the python to use, the stop file
#   mvlm_srun_torchrun ARGS...   one torchrun per node through srun: `python -m mvlm ARGS...` on
#                                NPROC_PER_NODE ranks per node (scripts/torchrun_multinode.sh)
#   mvlm_srun_per_task ARGS...   one task per GPU: `srun python -m mvlm ARGS...`; mvlm's own
#                                SLURM-variable init (mvlm/runtime/env.py) gives each task its rank
#   mvlm_srun_step SRUN_ARGS... -- CMD...   the generic form both of the above use
#
# Preemption. The templates ask for `#SBATCH --signal=B:USR1@120`: 120 s before the time limit
# Slurm sends SIGUSR1 to this batch shell only. The trap here (also on SIGTERM, which Slurm sends
# on preemption and scancel) touches the stop file (MVLM_STOP_FILE, read by every rank each step)
# and forwards SIGUSR1 to srun, which hands it to its tasks (torchrun forwards it to the ranks). The
# ranks finish the current step, save a checkpoint and exit 143 (mvlm.train.signals). When the step
# ends this way, the job requeues itself (`scontrol requeue`), and the requeued job -- the same
# script, same job id, same command -- resumes from `<output_dir>/latest`.
#
# Variables read (all optional):
#   MVLM_HOME          repo checkout with scripts/ (default: found from the submitted script)
#   MVLM_PYTHON        interpreter on the compute nodes (default: python, else python3)
#   VENV               a virtualenv to activate first
#   NPROC_PER_NODE     ranks per node (default: GPUs Slurm gave the node, else 1) -- set it on CPU
#   MASTER_PORT        rendezvous port (default 20000 + job id % 20000, same as mvlm's own init)
#   MVLM_MAX_REQUEUES  stop requeueing after this many restarts (default 50)
#   MVLM_NO_REQUEUE=1  checkpoint and stop on the signal, but do not requeue

mvlm_log() { echo "[mvlm-slurm $(date +%H:%M:%S) job ${SLURM_JOB_ID:-?}] $*" >&2; }

mvlm_slurm_setup() {
  if [ -n "${VENV:-}" ]; then
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
  fi
  if [ -z "${MVLM_PYTHON:-}" ]; then
    if command -v python >/dev/null 2>&1; then MVLM_PYTHON=python; else MVLM_PYTHON=python3; fi
  fi
  export MVLM_PYTHON
  # Run from the checkout so `python -m mvlm` works even without `pip install -e`.
  export PYTHONPATH="$MVLM_HOME${PYTHONPATH:+:$PYTHONPATH}"

  local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-$(hostname -s)}}
  NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  if [ -z "${MASTER_ADDR:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "$nodelist" 2>/dev/null | head -n 1)
    MASTER_ADDR=${MASTER_ADDR:-$(hostname -s)}
  fi
  MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
  if [ -z "${NPROC_PER_NODE:-}" ]; then
    # SLURM_GPUS_ON_NODE is set when the job asked for GPUs (--gpus-per-node / --gres).
    NPROC_PER_NODE=${SLURM_GPUS_ON_NODE:-1}
    [ "$NPROC_PER_NODE" -ge 1 ] 2>/dev/null || NPROC_PER_NODE=1
  fi
  export NNODES MASTER_ADDR MASTER_PORT NPROC_PER_NODE
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # A stop request that every rank on every node can see (the submit dir is on a shared FS).
  MVLM_STOP_FILE=${MVLM_STOP_FILE:-${SLURM_SUBMIT_DIR:-$PWD}/.mvlm-stop-${SLURM_JOB_ID:-0}}
  export MVLM_STOP_FILE
  rm -f "$MVLM_STOP_FILE"  # a requeued run must not see the previous run's request
  MVLM_PREEMPTED=
  mvlm_log "nodes=$NNODES ($nodelist) ranks/node=$NPROC_PER_NODE master=$MASTER_ADDR:$MASTER_PORT" \
           "restart=${SLURM_RESTART_COUNT:-0} python=$MVLM_PYTHON"
}

_mvlm_on_signal() {
  if [ -n "$MVLM_PREEMPTED" ]; then
    mvlm_log "caught SIG$1 again; ranks are already saving"
    return
  fi
  MVLM_PREEMPTED=$1
  mvlm_log "caught SIG$1: asking every rank to finish its step, checkpoint and stop"
  : > "$MVLM_STOP_FILE" || true
  if [ -n "${MVLM_STEP_PID:-}" ]; then
    kill -USR1 "$MVLM_STEP_PID" 2>/dev/null || true
  fi
}

mvlm_srun_step() {
  # mvlm_srun_step [srun args...] -- cmd [args...]; returns the step's status, or requeues the job.
  local srun_args=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do srun_args+=("$1"); shift; done
  if [ $# -eq 0 ]; then
    mvlm_log "mvlm_srun_step: missing '--' before the command"
    return 2
  fi
  shift
  trap '_mvlm_on_signal USR1' USR1
  trap '_mvlm_on_signal TERM' TERM
  # In the background, so the traps run at once (bash defers traps while a foreground job runs).
  srun "${srun_args[@]}" "$@" &
  MVLM_STEP_PID=$!
  local rc=0
  while :; do
    wait "$MVLM_STEP_PID" && rc=0 || rc=$?
    # `wait` also returns (>128) when a trapped signal arrives; keep waiting while srun lives.
    kill -0 "$MVLM_STEP_PID" 2>/dev/null || break
  done
  wait "$MVLM_STEP_PID" 2>/dev/null && rc=0 || rc=$?
  MVLM_STEP_PID=
  trap - USR1 TERM
  rm -f "$MVLM_STOP_FILE"
  mvlm_log "step ended with status $rc${MVLM_PREEMPTED:+ after SIG$MVLM_PREEMPTED}"

  if [ "$rc" -eq 0 ]; then
    return 0
  fi
  if [ -n "$MVLM_PREEMPTED" ] || [ "$rc" -eq 143 ]; then
    local restarts=${SLURM_RESTART_COUNT:-0}
    if [ -n "${MVLM_NO_REQUEUE:-}" ]; then
      mvlm_log "checkpointed and stopped; MVLM_NO_REQUEUE is set, not requeueing"
      return 143
    fi
    if [ "$restarts" -ge "${MVLM_MAX_REQUEUES:-50}" ]; then
      mvlm_log "already restarted $restarts times (MVLM_MAX_REQUEUES); not requeueing"
      return 143
    fi
    if [ -z "${SLURM_JOB_ID:-}" ]; then
      mvlm_log "not inside a Slurm job: would run 'scontrol requeue' here"
      return 143
    fi
    mvlm_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))); it resumes from latest"
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    mvlm_log "scontrol requeue failed (job cancelled?)"
    return 143
  fi
  return "$rc"
}

mvlm_srun_torchrun() {
  # One srun task per node; each runs torchrun with NPROC_PER_NODE ranks. NODE_RANK comes from the
  # task's SLURM_NODEID, evaluated on the node. Output lines are prefixed with the node index.
  # shellcheck disable=SC2016 # $SLURM_NODEID is expanded on the node, by that bash
  mvlm_srun_step --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    --label --cpu-bind=none -- \
    bash -c 'NODE_RANK=$SLURM_NODEID exec "$0" "$@"' "$MVLM_HOME/scripts/torchrun_multinode.sh" "$@"
}

mvlm_srun_per_task() {
  # One task per rank (per GPU); mvlm/runtime/env.py turns SLURM_PROCID/NTASKS/LOCALID into the
  # torchrun variables. Ranks that fail end the step (--kill-on-bad-exit).
  mvlm_srun_step --nodes="$NNODES" --ntasks="$((NNODES * NPROC_PER_NODE))" \
    --ntasks-per-node="$NPROC_PER_NODE" --kill-on-bad-exit=1 --label --cpu-bind=none -- \
    "$MVLM_PYTHON" -m mvlm "$@"
}
