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
#   OVERRIDES       more key.sub=value overrides, split at whitespace, no quoting (a quote in it
#                   is refused): values with spaces go in OVERRIDES_FILE or the arguments
#   OVERRIDES_FILE  a file of overrides, one per line, taken as it is; blank lines and lines
#                   starting with # are skipped. Order: OVERRIDES, OVERRIDES_FILE, arguments.
#   NUM_NODES       use only the first N hosts of the hostfile
#   GPUS_PER_NODE   use GPUs 0..N-1 of each host (default: all its slots)
#   MASTER_ADDR     address of the first host as the others reach it (default: DeepSpeed
#                   asks the first host with `hostname -I`)
#   MASTER_PORT     rendezvous port (default: 29500)
#   DEEPSPEED_ARGS  more launcher options, e.g. "--launcher openmpi" or "--include node1@node2"
#   TRAINER         what the launcher runs on every slot (default: --module
#                   megatron_style.train.pretrain; or a Python file)
# Stop: Ctrl-C, SIGTERM, SIGINT, SIGHUP or SIGUSR1 to this script asks every rank to save a
# checkpoint and stop (SIGTERM to each); the script waits for them and exits with the
# trainer's status (75: checkpoint saved). Resume: run the same command again (the trainer
# continues from the latest checkpoint, checkpoint.resume=auto).
set -euo pipefail

# Signals first: one that arrives while the launcher starts is kept and delivered to the ranks
# once they can take it (see deliver_stop).
stop_signal="" delivered=0 runner=""
# shellcheck disable=SC2317  # called from the traps
on_signal() {
    if [[ -z "$stop_signal" ]]; then
        stop_signal="$1"
        echo "launch_deepspeed.sh: got SIG$1: asking every rank to save a checkpoint and stop" \
            "(SIGKILL the process group ${runner:-of the launcher} to abort without one)"
    else
        echo "launch_deepspeed.sh: got SIG$1 again: still waiting for the ranks to stop"
    fi
}
for sig in TERM INT HUP USR1; do
    # shellcheck disable=SC2064  # the signal name is meant to be expanded now
    trap "on_signal $sig" "$sig"
done

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

# Overrides exactly as cluster/pretrain.sh reads them.
if [[ "${OVERRIDES:-}" == *[\"\']* ]]; then
    echo "launch_deepspeed.sh: OVERRIDES is split at whitespace and does not understand quotes:" \
        "put overrides whose values contain spaces in OVERRIDES_FILE (one per line) or pass" \
        "them as arguments" >&2
    exit 2
fi
read -r -a overrides <<<"${OVERRIDES:-}"
if [[ -n "${OVERRIDES_FILE:-}" ]]; then
    # One reader for both launch scripts: megatron_style/cli/overrides_file.py.
    mapfile -d '' -O "${#overrides[@]}" overrides < <(python -m megatron_style.cli.overrides_file "$OVERRIDES_FILE")
    wait $! || { echo "launch_deepspeed.sh: OVERRIDES_FILE: see above" >&2; exit 2; }
fi
overrides+=("$@")
read -r -a extra <<<"${DEEPSPEED_ARGS:-}"
read -r -a script <<<"${TRAINER:---module megatron_style.train.pretrain}"
launcher=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
[[ -n "${MASTER_ADDR:-}" ]] && launcher+=(--master_addr "$MASTER_ADDR")
[[ -n "${NUM_NODES:-}" ]] && launcher+=(--num_nodes "$NUM_NODES")
[[ -n "${GPUS_PER_NODE:-}" ]] && launcher+=(--num_gpus "$GPUS_PER_NODE")

echo "==== $(date '+%F %T') deepspeed launcher: hosts from $HOSTFILE"
grep -v '^[[:space:]]*\(#\|$\)' "$HOSTFILE" | sed 's/^/  /'
echo "config: $CONFIG${overrides[0]+$(printf ' %q' "${overrides[@]}")}"

# Who gets a stop request. The launcher is three levels deep: `deepspeed` (runner.py) starts
# deepspeed.launcher.launch on each host (here directly, or over pdsh/ssh), which starts the
# ranks. On one host the runner has no signal handler (SIGTERM, SIGINT, SIGUSR1 kill it and
# the rest trains on, orphaned), and launch.py turns SIGTERM/SIGINT into SIGTERM to one rank
# after the other, 30 s each before SIGKILL, then exits 1 whatever the ranks said. So the
# ranks are asked directly: SIGTERM to each child of each local launch.py, once that child
# handles SIGTERM (SigCgt in /proc: before its handler is installed the default action would
# kill it). Their status (75) then comes back through launch.py and the runner unchanged.
# Several hosts over pdsh: the runner's own handler passes SIGTERM on to every host (pkill of
# launch.py there), so the runner gets it.
catches_term() {
    local mask
    mask="$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null)" || return 1
    [[ -n "$mask" ]] && (( (16#$mask >> 14) & 1 ))
}
# shellcheck disable=SC2317  # called from the wait loop
deliver_stop() {
    local launches ranks=() l r waiting=0
    launches="$(pgrep -P "$runner" -f deepspeed.launcher.launch || true)"
    if [[ -z "$launches" ]]; then
        if pgrep -P "$runner" -x pdsh >/dev/null; then
            kill -TERM "$runner" 2>/dev/null || true
            delivered=1
        fi
        return 0  # still starting (or another --launcher: see cluster/README.md)
    fi
    for l in $launches; do
        for r in $(pgrep -P "$l" || true); do ranks+=("$r"); done
    done
    [[ ${#ranks[@]} -gt 0 ]] || return 0
    for r in "${ranks[@]}"; do
        if catches_term "$r"; then kill -TERM "$r" 2>/dev/null || true; else waiting=1; fi
    done
    # Started and not yet listening: try again next round (the signalled ones ignore repeats).
    [[ $waiting == 1 ]] || delivered=1
}

# Its own process group (setsid): Ctrl-C in the terminal reaches this script only, not the
# launcher and the ranks at once (a rank with SIGINT would die of KeyboardInterrupt); the
# traps above decide what the ranks get. `kill -KILL -- -<pgid>` ends all of it at once.
setsid deepspeed "${launcher[@]}" "${extra[@]}" "${script[@]}" \
    --config "$CONFIG" "${overrides[@]}" &
runner=$!
echo "launcher: pid $runner (process group $runner)"

rc=0
while kill -0 "$runner" 2>/dev/null; do
    if [[ -n "$stop_signal" && $delivered == 0 ]]; then deliver_stop; fi
    # sleep in the background + wait: a trapped signal interrupts `wait` at once.
    sleep 0.5 &
    wait $! 2>/dev/null || true
done
wait "$runner" || rc=$?

left="$(pgrep -g "$runner" || true)"
if [[ -n "$left" ]]; then
    echo "launch_deepspeed.sh: WARNING: processes of the launch still run after the launcher" \
        "ended: $(echo "$left" | tr '\n' ' ')(kill -TERM -- -$runner)"
fi
case "$rc" in
    0) echo "launch_deepspeed.sh: training finished" ;;
    75) echo "launch_deepspeed.sh: stopped with a checkpoint (exit 75): run the same command to resume" ;;
    4) echo "launch_deepspeed.sh: stopped without a checkpoint (exit 4, checkpoint.save=false?)" ;;
    2) echo "launch_deepspeed.sh: the trainer rejected the configuration (exit 2)" ;;
    *) echo "launch_deepspeed.sh: the launcher exited with status $rc" ;;
esac
exit "$rc"
