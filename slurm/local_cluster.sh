#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (for the tests, or to try contrastive-submit).
#
#   bash slurm/local_cluster.sh install          # Debian packages (slurmctld slurmd slurm-client munge)
#   bash slurm/local_cluster.sh start DIR        # config, state and logs under DIR; waits for the node
#   bash slurm/local_cluster.sh stop DIR
#
# Runs as root (slurmd needs it). No cgroups, no accounting: proctrack/linuxproc and task/none.
set -euo pipefail
cmd=${1:?usage: local_cluster.sh install|start DIR|stop DIR}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ "$cmd" = install ]; then
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null
    fi
    exit 0
fi

dir=$(realpath -m "${2:?a directory for the cluster config, state and logs}")
export SLURM_CONF="$dir/slurm.conf"

if [ "$cmd" = stop ]; then
    for pid in "$dir"/slurmd.pid "$dir"/slurmctld.pid; do
        [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
    done
    sleep 1
    mdir=$(cat "$dir/munge_dir" 2>/dev/null || true)
    [ -n "$mdir" ] && [ -f "$mdir/munged.pid" ] && kill "$(cat "$mdir/munged.pid")" 2>/dev/null || true
    exit 0
fi

host=$(hostname -s)
cpus=$(nproc --all)  # the machine's CPUs, as slurmd counts them, also when started under taskset
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
mkdir -p "$dir"/{state,spool}
# munged runs as user munge, which may not enter $dir (pytest's temporary directories are 0700).
mdir=$(mktemp -d /tmp/contrastive-munge.XXXXXX)
chown munge:munge "$mdir"
echo "$mdir" >"$dir/munge_dir"
cat >"$SLURM_CONF" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$((6817 + RANDOM % 1000))
SlurmdPort=$((7817 + RANDOM % 1000))
AuthType=auth/munge
AuthInfo=socket=$mdir/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
SlurmUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

runuser -u munge -- /usr/sbin/munged --socket="$mdir/munge.socket" --pid-file="$mdir/munged.pid" \
    --log-file="$mdir/munged.log" --seed-file="$mdir/seed" --force
slurmctld -i
slurmd
for _ in $(seq 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qx idle; then
        echo "SLURM is up: SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
echo "SLURM did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
