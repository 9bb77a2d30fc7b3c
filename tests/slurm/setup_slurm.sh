#!/usr/bin/env bash
# Start a single-node Slurm (slurmctld + slurmd + munge) for the workflow's Slurm test.
# Idempotent: installs Debian's packages if missing, writes the config once, starts only the daemons
# that are not running, and records what it started in $STATE so teardown stops only those.
# Facts this relies on (Debian 12, no systemd, no cgroups): proctrack/linuxproc, task/none,
# NodeName = `hostname -s`, daemons in the foreground (-D) in the background.
set -euo pipefail
STATE=${SLURM_TEST_STATE:-/tmp/neox-mlc-slurm}
mkdir -p "$STATE"
: > "$STATE/started"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

node=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /run/slurm
chown -R munge:munge /run/munge 2>/dev/null || true
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
fi
conf=/etc/slurm/slurm.conf
if ! grep -q "neox-mlc-workflow test cluster" "$conf" 2>/dev/null; then
  cat > "$conf" <<CONF
# neox-mlc-workflow test cluster (written by tests/slurm/setup_slurm.sh)
ClusterName=neoxtest
SlurmctldHost=$node
SlurmUser=root
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
MinJobAge=3600
NodeName=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
fi

if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
  echo munged >> "$STATE/started"
fi
if ! pgrep -x slurmctld >/dev/null; then
  (setsid /usr/sbin/slurmctld -D > "$STATE/slurmctld.out" 2>&1 &)
  echo slurmctld >> "$STATE/started"
fi
if ! pgrep -x slurmd >/dev/null; then
  (setsid /usr/sbin/slurmd -D > "$STATE/slurmd.out" 2>&1 &)
  echo slurmd >> "$STATE/started"
fi
for _ in $(seq 1 30); do
  if sinfo -h -o "%T" 2>/dev/null | grep -qE "idle|mix|alloc"; then
    scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
    echo "slurm ready on $node"
    exit 0
  fi
  scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "slurm did not become ready" >&2
sinfo >&2 || true
exit 1
