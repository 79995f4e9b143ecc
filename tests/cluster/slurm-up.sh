#!/usr/bin/env bash
# A one-node SLURM on this machine, for the tests marked `slurm` and for trying the cluster commands by hand:
# munged, slurmctld and slurmd (as root), node = this host with its own CPUs and memory, one default partition,
# no accounting, no cgroups (proctrack/linuxproc, task/none: works in containers and VMs).
#   tests/cluster/slurm-up.sh          install (apt-get, only what is missing), configure, start; waits until idle
#   tests/cluster/slurm-up.sh down     stop what it started (scontrol shutdown, then munged)
# Idempotent: run it again and it only checks that the node answers. State lives under /var/spool/slurm-tests,
# logs under /var/log/slurm-tests, the config in /etc/slurm/slurm.conf (written only when absent or ours).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurm-tests
LOGS=/var/log/slurm-tests
MARK="# written by saliency-tubes tests/cluster/slurm-up.sh"
HOST="$(hostname -s)"

say() { echo "slurm-up: $*"; }

down() {
    if command -v scontrol >/dev/null 2>&1 && scontrol ping >/dev/null 2>&1; then
        $SUDO scontrol shutdown >/dev/null 2>&1 || true
    fi
    for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
        if [ -f "$pidfile" ]; then
            pid="$(cat "$pidfile")"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            if kill -0 "$pid" 2>/dev/null; then $SUDO kill "$pid" 2>/dev/null || true; fi
            $SUDO rm -f "$pidfile"
        fi
    done
    say "stopped"
}

if [ "${1:-up}" = "down" ]; then down; exit 0; fi

node_state() { sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1; }

# 1. packages, only those missing
missing=()
command -v munged >/dev/null 2>&1 || missing+=(munge)
command -v slurmctld >/dev/null 2>&1 || missing+=(slurm-wlm)
command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. munge: a key, then munged as the munge user
if [ ! -s /etc/munge/munge.key ]; then
    $SUDO mkdir -p /etc/munge
    $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    $SUDO chown munge:munge /etc/munge/munge.key
    $SUDO chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    $SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge
    $SUDO chown munge:munge /run/munge /var/log/munge /var/lib/munge
    $SUDO runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null || { say "munged does not answer (see /var/log/munge/munged.log)"; exit 1; }

# 3. slurm.conf for this host (kept if someone else's)
read -r CPUS MEMORY < <(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*RealMemory=\([0-9]*\).*/\1 \2/p')
WANT="$(cat <<CONF
$MARK
ClusterName=saliency
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
NodeName=$HOST CPUs=$CPUS RealMemory=$MEMORY State=UNKNOWN
PartitionName=main Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
)"
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    say "keeping $CONF (not written by this script)"
elif [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$WANT" ]; then
    $SUDO mkdir -p /etc/slurm
    echo "$WANT" | $SUDO tee "$CONF" >/dev/null
    if scontrol ping >/dev/null 2>&1; then $SUDO scontrol reconfigure; fi
fi
$SUDO mkdir -p "$STATE/ctld" "$STATE/d" "$LOGS"

# 4. the daemons, unless they run
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
pid_alive "$STATE/slurmctld.pid" || $SUDO /usr/sbin/slurmctld
pid_alive "$STATE/slurmd.pid" || $SUDO /usr/sbin/slurmd

# 5. wait for the node to be idle (a node left down by an earlier run is resumed)
for i in $(seq 150); do
    state="$(node_state || true)"
    case "$state" in
        idle|mix|alloc) say "node $HOST is $state ($CPUS CPUs, $MEMORY MB); sinfo:"; sinfo; exit 0 ;;
        down*|drain*) $SUDO scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
say "node $HOST did not become idle (state: ${state:-no answer}); see $LOGS/"
exit 1
