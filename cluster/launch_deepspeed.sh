#!/usr/bin/env bash
# Multi-node pretraining without Slurm: the DeepSpeed launcher reads a hostfile and starts one
# trainer process per GPU on every host listed (over pdsh/ssh from this machine).
#
#   cp cluster/hostfile.example cluster/hostfile      # then list your hosts and their GPUs
#   cluster/launch_deepspeed.sh [key.sub=value ...]
#   HOSTFILE=hosts.txt CONFIG=configs/pretrain/base.yaml cluster/launch_deepspeed.sh steps=1000
#
# Run it from the repository root: every host needs the same checkout and Python environment
# at the same paths (the launcher cd's to this directory on each host).
# Environment:
#   HOSTFILE        "<host> slots=<GPUs>" lines (default: cluster/hostfile)
#   CONFIG          recipe (default: configs/pretrain/demo.yaml)
#   OVERRIDES       more key.sub=value overrides, space-separated (arguments come after them)
#   NUM_NODES       use only the first N hosts of the hostfile
#   GPUS_PER_NODE   use GPUs 0..N-1 of each host (default: all its slots)
#   MASTER_ADDR     address of the first host as the others reach it (default: DeepSpeed
#                   asks the first host with `hostname -I`)
#   MASTER_PORT     rendezvous port (default: 29500)
#   DEEPSPEED_ARGS  more launcher options, e.g. "--launcher openmpi" or "--include node1@node2"
# Resume: the trainer continues from the latest checkpoint (checkpoint.resume=auto); after a
# stop (Ctrl-C, SIGTERM: the trainer saves and exits 75) run the same command again.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOSTFILE="${HOSTFILE:-$here/hostfile}"
CONFIG="${CONFIG:-configs/pretrain/demo.yaml}"

if [[ ! -f "$HOSTFILE" ]]; then
    echo "launch_deepspeed.sh: no hostfile at $HOSTFILE; start from cluster/hostfile.example" \
        "(cp cluster/hostfile.example cluster/hostfile) or set HOSTFILE=..." >&2
    exit 1
fi
if ! command -v deepspeed >/dev/null 2>&1; then
    echo "launch_deepspeed.sh: the deepspeed launcher is not on PATH (pip install deepspeed)" >&2
    exit 1
fi

read -r -a overrides <<<"${OVERRIDES:-}"
read -r -a extra <<<"${DEEPSPEED_ARGS:-}"
launcher=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
[[ -n "${MASTER_ADDR:-}" ]] && launcher+=(--master_addr "$MASTER_ADDR")
[[ -n "${NUM_NODES:-}" ]] && launcher+=(--num_nodes "$NUM_NODES")
[[ -n "${GPUS_PER_NODE:-}" ]] && launcher+=(--num_gpus "$GPUS_PER_NODE")

echo "==== $(date '+%F %T') deepspeed launcher: hosts from $HOSTFILE"
grep -v '^[[:space:]]*\(#\|$\)' "$HOSTFILE" | sed 's/^/  /'
echo "config: $CONFIG ${overrides[*]} $*"

# exec: Ctrl-C / SIGTERM reach the launcher, which passes them to every rank.
exec deepspeed "${launcher[@]}" "${extra[@]}" --module megatron_style.train.pretrain \
    --config "$CONFIG" "${overrides[@]}" "$@"
