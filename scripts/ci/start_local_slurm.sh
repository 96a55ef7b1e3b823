#!/usr/bin/env bash
# Start a single-node Slurm (munged + slurmctld + slurmd) on this machine for the Slurm tests.
#
#   scripts/ci/start_local_slurm.sh [--install]
#
# --install  apt-get installs Debian's slurmctld, slurmd, slurm-client and munge first if they are
#            missing (needs root; ~25 s on the CI box). Without it a missing Slurm is an error.
#
# Idempotent: when `scontrol ping` already answers, nothing is started. The node claims
# MVLM_SLURM_CPUS CPUs (default 8; slurmd is told to accept more than the hardware has) so that
# several 2-task jobs can be queued while one runs. Plugins chosen to run without systemd or
# cgroups: proctrack/linuxproc, task/none, no accounting. Everything (config, state, logs) lives
# under MVLM_SLURM_DIR (default /tmp/mvlm-slurm); the config is also copied to /etc/slurm so
# sbatch/squeue/scontrol find it without SLURM_CONF.
set -euo pipefail

INSTALL=0
for a in "$@"; do
  case "$a" in
    --install) INSTALL=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "start_local_slurm.sh: unknown argument $a (expected --install)" >&2; exit 2 ;;
  esac
done

SLURM_DIR=${MVLM_SLURM_DIR:-/tmp/mvlm-slurm}
CPUS=${MVLM_SLURM_CPUS:-8}
NODE=$(hostname -s)

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
  && command -v sbatch >/dev/null && command -v munged >/dev/null; }

if ! have_slurm; then
  if [ "$INSTALL" -ne 1 ]; then
    echo "start_local_slurm.sh: slurmctld/slurmd/sbatch/munged not installed (rerun with --install)" >&2
    exit 3
  fi
  t0=$(date +%s)
  export DEBIAN_FRONTEND=noninteractive
  # apt-get update only when the package lists are absent (saves ~3-10 s on a warm box).
  if ! apt-cache show slurmctld >/dev/null 2>&1; then apt-get update -q >/dev/null; fi
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  echo "start_local_slurm.sh: installed slurm in $(( $(date +%s) - t0 )) s"
fi

if scontrol ping 2>/dev/null | grep -q "is UP"; then
  echo "start_local_slurm.sh: slurmctld already up"
  exit 0
fi

mkdir -p "$SLURM_DIR"/{state,spool,log} /etc/slurm /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true

# munge: the Debian package creates /etc/munge/munge.key; make one if it did not.
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force
  else
    /usr/sbin/munged --force
  fi
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

cat > "$SLURM_DIR/slurm.conf" <<CONF
# Written by scripts/ci/start_local_slurm.sh: single node, no cgroups, no accounting.
ClusterName=mvlm-ci
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
SlurmctldPort=${MVLM_SLURMCTLD_PORT:-6817}
SlurmdPort=${MVLM_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
MinJobAge=600
SchedulerParameters=defer=0,sched_interval=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
NodeName=$NODE CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
cp "$SLURM_DIR/slurm.conf" /etc/slurm/slurm.conf
echo "" > /etc/slurm/cgroup.conf

# -c: start with no saved jobs (a previous run's requeued jobs must not come back)
/usr/sbin/slurmctld -c -f /etc/slurm/slurm.conf
/usr/sbin/slurmd -f /etc/slurm/slurm.conf
for _ in $(seq 100); do
  if sinfo -h -o "%T" 2>/dev/null | grep -qE "^(idle|mixed|allocated)"; then
    echo "start_local_slurm.sh: slurm up on $NODE ($CPUS CPUs), logs in $SLURM_DIR/log"
    exit 0
  fi
  sleep 0.2
done
echo "start_local_slurm.sh: slurm did not come up; node state: $(sinfo -h -o '%T %E' 2>&1)" >&2
tail -n 20 "$SLURM_DIR/log/slurmctld.log" "$SLURM_DIR/log/slurmd.log" >&2 || true
exit 1
