#!/usr/bin/env bash
# A Slurm on this machine, for the tests in tests/cluster/ and for trying cluster/pretrain.sh
# without a cluster: one node, or several nodes in network namespaces (LOCAL_SLURM_NODES).
#
#   cluster/local_slurm.sh start [DIR]   install packages if missing, start munged/slurmctld/slurmd
#   cluster/local_slurm.sh stop [DIR]    cancel jobs, stop the daemons this script started
#   cluster/local_slurm.sh status [DIR]  daemons, node and queue; exit 0 only when usable
#   cluster/local_slurm.sh env [DIR]     print `export SLURM_CONF=...` (use: eval "$(... env)")
#
# DIR (default $LOCAL_SLURM_DIR or /tmp/local-slurm) holds slurm.conf, state, spool, logs and
# pid files; nothing is written to /etc/slurm. Clients find the cluster through SLURM_CONF.
# Exit status: 0 ok, 1 failure (daemon logs are shown), 3 Slurm is not installed and cannot be
# installed here (no root or no apt-get): the tests skip on 3.
# Environment: LOCAL_SLURM_CTLD_PORT / LOCAL_SLURM_SLURMD_PORT (default 6817 / 6818);
# LOCAL_SLURM_NODES=N (default 1): N>1 starts N slurmd, each in its own network namespace with
# its own address (cluster/netns_nodes.sh), nodes slurm-n1..N; jobs spanning them need
# GLOO_SOCKET_IFNAME=sl0 (and NCCL_SOCKET_IFNAME) in their environment.
set -euo pipefail
# The daemons and munged live in /usr/sbin, which a non-login root shell may not have on PATH.
export PATH="$PATH:/usr/sbin:/sbin"

CMD="${1:-}"
DIR="${2:-${LOCAL_SLURM_DIR:-/tmp/local-slurm}}"
CONF="$DIR/slurm.conf"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CTLD_PORT="${LOCAL_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${LOCAL_SLURM_SLURMD_PORT:-6818}"
PACKAGES=(munge slurmctld slurmd slurm-client)

log() { echo "local_slurm: $*" >&2; }

# The nodes: one named after this machine on 127.0.0.1, or slurm-n<i> on 10.77.0.<10+i> in
# namespace slurm-n<i> (slurmctld then listens on the bridge, 10.77.0.1). The count is fixed
# at start and kept in DIR/nodes for stop/status.
read_nodes() {
    local n="$1" i
    NAMES=() ADDRS=()
    if [[ "$n" == 1 ]]; then
        NAMES=("$(hostname -s)") ADDRS=(127.0.0.1) CTLD_ADDR=127.0.0.1
    else
        for i in $(seq "$n"); do NAMES+=("slurm-n$i"); ADDRS+=("10.77.0.$((10 + i))"); done
        CTLD_ADDR=10.77.0.1
    fi
}
NODES="$(cat "$DIR/nodes" 2>/dev/null || echo "${LOCAL_SLURM_NODES:-1}")"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || { log "LOCAL_SLURM_NODES must be a positive number"; exit 2; }
read_nodes "$NODES"

show_logs() {
    local f
    for f in "$DIR/log/slurmctld.log" "$DIR/log/"slurmd-*.log /var/log/munge/munged.log; do
        [[ -f "$f" ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

fail() { log "ERROR: $*"; show_logs; exit 1; }

# pid from a pid file, if that process is alive
alive_pid() {
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(cat "$1")"
    kill -0 "$pid" 2>/dev/null && echo "$pid"
}

install_packages() {
    local missing=() p
    for p in munged slurmctld slurmd sbatch; do
        command -v "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ "$(id -u)" != 0 ]]; then
        log "Slurm is not installed (missing: ${missing[*]}) and installing needs root"; exit 3
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        log "Slurm is not installed (missing: ${missing[*]}) and there is no apt-get"; exit 3
    fi
    log "installing ${PACKAGES[*]} with apt-get"
    # Packages start their daemons from postinst where they can; a policy-rc.d answering 101
    # stops that (we start them ourselves, with our own config). Removed again afterwards.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
    fi
    local rc=0 out="$DIR/log/apt.log"
    {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" \
            || { DEBIAN_FRONTEND=noninteractive apt-get update -q \
                 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                    "${PACKAGES[@]}"; }
    } >"$out" 2>&1 || rc=$?
    [[ $added_policy == 1 ]] && rm -f "$policy"
    if [[ $rc != 0 ]]; then
        tail -n 20 "$out" >&2
        log "apt-get install ${PACKAGES[*]} failed (log: $out)"; exit 3
    fi
}

start_munge() {
    # Any working munged will do (one started by the system or an earlier run).
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    # munged refuses to run as root and insists on its own directories being owned by it.
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    # --force: a socket left behind by a munged that died would otherwise block the start.
    runuser -u munge -- /usr/sbin/munged --force || fail "munged did not start"
    cp /run/munge/munged.pid "$DIR/run/munged.pid" 2>/dev/null || true
    local i
    for i in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    fail "munged runs but munge/unmunge does not work"
}

write_conf() {
    local cpus mem_mb i
    cpus="$(nproc)"
    # Announce a bit less memory than the machine has: a node claiming more than slurmd
    # finds is drained ("Low RealMemory"). Namespace nodes share the machine: each gets
    # all CPUs (oversubscribed) and a share of the memory.
    mem_mb="$(free -m | awk -v n="$NODES" '/^Mem:/ {print int($2 * 0.9 / n)}')"
    cat >"$CONF" <<EOF
# Written by cluster/local_slurm.sh: ${NODES} node(s) on $(hostname -s).
ClusterName=local
SlurmctldHost=$(hostname -s)($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
# No cgroups here (containers, VMs): track processes by parentage, no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# A requeued job that becomes eligible by time (its BeginTime) is started by the main
# scheduling loop, every sched_interval seconds (default 60: every requeue in the tests would
# wait up to a minute for it).
SchedulerParameters=sched_interval=2
# Lets \`scontrol requeue\` put a batch job back in the queue (pretrain.sh does on exit 75).
JobRequeue=1
# A node that was down comes back by itself when its slurmd registers again.
ReturnToService=2
# Finished jobs stay visible to \`scontrol show job\` for 10 minutes (tests read their state).
MinJobAge=600
# Seconds between SIGTERM and SIGKILL at cancel/time limit; short so that tests end quickly.
KillWait=10
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    for i in "${!NAMES[@]}"; do
        echo "NodeName=${NAMES[$i]} NodeAddr=${ADDRS[$i]} CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    done >>"$CONF"
}

wait_idle() {
    local i states="" bad
    for i in $(seq 60); do
        # "name=state" per node; ready when every node is idle (or already running jobs).
        states="$(sinfo -h -N -o '%N=%T' 2>/dev/null | sort -u | tr '\n' ' ')"
        bad="$(grep -oE '\S+=(drain|invalid|fail)\S*' <<<"$states" || true)"
        [[ -n "$bad" ]] && { sinfo -R >&2 || true; fail "node(s) unusable: $bad"; }
        if [[ -n "$states" ]] && ! tr ' ' '\n' <<<"${states% }" | grep -qvE '=(idle|mixed|allocated)$'; then
            log "ready: ${states% } (SLURM_CONF=$CONF)"
            return 0
        fi
        sleep 0.5
    done
    sinfo -R >&2 || true
    fail "nodes not idle after 30 s: ${states:-no answer from sinfo}"
}

# All slurmd of the cluster alive?
slurmds_alive() {
    local name
    for name in "${NAMES[@]}"; do alive_pid "$DIR/run/slurmd-$name.pid" >/dev/null || return 1; done
}

start() {
    mkdir -p "$DIR"/{state,spool,log,run}
    install_packages
    export SLURM_CONF="$CONF"
    if [[ "$(id -u)" != 0 ]]; then log "starting the daemons needs root"; exit 3; fi
    start_munge
    if alive_pid "$DIR/run/slurmctld.pid" >/dev/null && slurmds_alive; then
        log "already running in $DIR"
        wait_idle
        return 0
    fi
    if [[ "$NODES" -gt 1 ]]; then
        "$HERE/netns_nodes.sh" up "$NODES" \
            || { log "cannot create network namespaces for $NODES nodes here"; exit 3; }
    fi
    echo "$NODES" >"$DIR/nodes"
    # Rewritten on every start: the machine or the port variables may have changed.
    write_conf
    if ! alive_pid "$DIR/run/slurmctld.pid" >/dev/null; then
        # Nothing of an earlier cluster in DIR is worth recovering: start clean (-c).
        slurmctld -c -f "$CONF" || fail "slurmctld did not start"
    fi
    local i
    for i in "${!NAMES[@]}"; do
        alive_pid "$DIR/run/slurmd-${NAMES[$i]}.pid" >/dev/null && continue
        mkdir -p "$DIR/spool/slurmd-${NAMES[$i]}"
        if [[ "$NODES" -gt 1 ]]; then
            # nsenter, not `ip netns exec`: that one mounts a fresh /sys without
            # /sys/fs/cgroup, and slurmd refuses to start without it.
            nsenter --net="/run/netns/${NAMES[$i]}" slurmd -N "${NAMES[$i]}" -f "$CONF" \
                || fail "slurmd ${NAMES[$i]} did not start"
        else
            slurmd -N "${NAMES[$i]}" -f "$CONF" || fail "slurmd did not start"
        fi
    done
    for i in $(seq 40); do
        scontrol ping >/dev/null 2>&1 && break
        sleep 0.25
    done
    scontrol ping >/dev/null 2>&1 || fail "slurmctld does not answer (scontrol ping)"
    wait_idle
}

# SIGTERM to the daemons named (pid files in DIR/run), SIGKILL to any still alive after 10 s.
terminate() {
    local name pid pids=() i
    for name in "$@"; do
        pid="$(alive_pid "$DIR/run/$name.pid")" || continue
        pids+=("$pid")
        kill -TERM "$pid" 2>/dev/null || true
    done
    for i in $(seq 40); do
        any_alive "${pids[@]}" || break
        sleep 0.25
    done
    for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid ignored SIGTERM for 10 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for name in "$@"; do rm -f "$DIR/run/$name.pid"; done
}

any_alive() {
    local pid
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
    return 1
}

stop() {
    export SLURM_CONF="$CONF"
    local i
    if alive_pid "$DIR/run/slurmctld.pid" >/dev/null; then
        # Running jobs would outlive slurmd (their slurmstepd is not its child): cancel first.
        scancel --partition=local 2>/dev/null || true
        for i in $(seq 40); do
            [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
    local name slurmds=()
    for name in "${NAMES[@]}"; do slurmds+=("slurmd-$name"); done
    terminate "${slurmds[@]}" slurmctld
    # munged last (the daemons talk to it while shutting down), and only if we started it.
    terminate munged
    if [[ "$NODES" -gt 1 ]]; then "$HERE/netns_nodes.sh" down "$NODES"; fi
    rm -f "$DIR/nodes"
    log "stopped (state kept in $DIR)"
}

status() {
    export SLURM_CONF="$CONF"
    local name ok=0
    for name in slurmctld "${NAMES[@]/#/slurmd-}"; do
        if pid="$(alive_pid "$DIR/run/$name.pid")"; then echo "$name: running (pid $pid)"
        else echo "$name: not running"; ok=1; fi
    done
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then echo "munged: running"
    else echo "munged: not running"; ok=1; fi
    if [[ $ok == 0 ]]; then
        sinfo -N -l || ok=1
        squeue || ok=1
    fi
    return "$ok"
}

case "$CMD" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$(printf '%q' "$CONF")" ;;
    *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
