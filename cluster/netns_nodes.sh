#!/usr/bin/env bash
# Network namespaces that play separate machines for a multi-node local Slurm
# (LOCAL_SLURM_NODES=N cluster/local_slurm.sh start): node i is namespace slurm-n<i> whose
# interface sl0 has 10.77.0.<10+i>, cabled by a veth pair to the bridge slurmbr0 (10.77.0.1,
# where slurmctld listens) in the host's namespace. Each node's slurmd runs inside its
# namespace; the filesystem, processes and munged's socket stay shared.
# Node names go into /etc/hosts (lines ending "# local_slurm") because jobs resolve them:
# MASTER_ADDR is the first node's name. Ranks must use sl0 for gloo (GLOO_SOCKET_IFNAME=sl0):
# the hostname, shared by all namespaces, resolves to 127.0.0.1.
#
#   cluster/netns_nodes.sh up N      create (idempotent)
#   cluster/netns_nodes.sh down N    remove
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

BRIDGE=slurmbr0
NET=10.77.0
MARK="# local_slurm"

up() {
    local n="$1" i ns
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$NET.1/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    for i in $(seq "$n"); do
        ns="slurm-n$i"
        [[ -e "/run/netns/$ns" ]] || ip netns add "$ns"
        if ! ip link show "veth-n$i" >/dev/null 2>&1; then
            ip link add "veth-n$i" type veth peer name sl0 netns "$ns"
            ip link set "veth-n$i" master "$BRIDGE" up
            ip -n "$ns" addr add "$NET.$((10 + i))/24" dev sl0
        fi
        ip -n "$ns" link set sl0 up
        ip -n "$ns" link set lo up
        grep -q "^$NET.$((10 + i)) $ns " /etc/hosts \
            || echo "$NET.$((10 + i)) $ns $MARK" >>/etc/hosts
    done
}

down() {
    local n="$1" i
    for i in $(seq "$n"); do
        ip link del "veth-n$i" 2>/dev/null || true
        [[ -e "/run/netns/slurm-n$i" ]] && ip netns del "slurm-n$i"
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    # Rewrite in place (not sed -i): /etc/hosts is often a bind mount that cannot be replaced.
    local kept
    kept="$(grep -v "$MARK\$" /etc/hosts || true)"
    printf '%s\n' "$kept" >/etc/hosts
}

case "${1:-}" in
    up|down) [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "usage: $0 up|down N" >&2; exit 2; }; "$1" "$2" ;;
    *) echo "usage: $0 up|down N" >&2; exit 2 ;;
esac
