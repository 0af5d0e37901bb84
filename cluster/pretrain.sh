#!/usr/bin/env bash
# Pretraining on a Slurm cluster: one trainer process per GPU on every node of the job,
# automatic resume from the latest checkpoint, requeue when the trainer was preempted.
#
#   sbatch cluster/pretrain.sh [key.sub=value ...]
#   CONFIG=configs/pretrain/base.yaml sbatch --nodes=4 --time=48:00:00 cluster/pretrain.sh
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 cluster/pretrain.sh steps=20
#
# Every #SBATCH default below can be overridden on the sbatch command line or through Slurm's
# own SBATCH_* variables (SBATCH_GPUS_PER_NODE=4, SBATCH_TIMELIMIT=2:00:00, SBATCH_PARTITION=..).
# Variables read here (sbatch exports the submitting shell's environment into the job):
#   CONFIG          recipe, relative to the directory sbatch ran in (default configs/pretrain/demo.yaml)
#   OVERRIDES       more key.sub=value overrides, split at whitespace, no quoting (a quote in it
#                   is refused): values with spaces go in OVERRIDES_FILE or the arguments
#   OVERRIDES_FILE  a file of overrides, one per line, taken as it is (no quoting, no
#                   expansion); blank lines and lines starting with # are skipped
#                   Order: OVERRIDES, then OVERRIDES_FILE, then the script's arguments.
#   TRAINER         the training command, split at whitespace (default: python -m
#                   megatron_style.train.pretrain)
#   MASTER_PORT     rendezvous port (default: 20000 + job id % 20000, the same after a requeue)
#   MAX_RESTARTS    requeue at most this many times (Slurm's restart count; default 20)
# One task per GPU: with GPUs, srun starts --gpus-per-node tasks per node; with 0 GPUs (CPU,
# gloo) it starts --ntasks-per-node tasks. The trainer exits 75 after saving a checkpoint when
# it receives SIGUSR1 (sent 300 s before the time limit) or SIGTERM; this script then requeues
# the job, and the next run resumes from that checkpoint. Any other status ends the job
# (cluster/README.md has the table).
#
#SBATCH --job-name=beit3-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# The trainer's exit statuses (megatron_style/train/exit_codes.py).
OK=0 BAD_CONFIG=2 NONFINITE=3 STOPPED=4 PREEMPTED=75 STALLED=124
say() { echo "pretrain.sh: $*"; }

# Signals first, before anything that takes time: the batch shell gets them too (scancel
# --batch, --signal=B:USR1@.., preemption) and the default action would kill it, and with it
# the requeue. Until srun runs they are remembered (the trainer is then not started at all);
# while it runs they go on to the tasks; after it ended they change nothing.
stop_signal=""
srun_pid=""
# shellcheck disable=SC2317  # called from the traps
on_signal() {
    if [[ -n "$srun_pid" ]] && kill -0 "$srun_pid" 2>/dev/null; then
        # As SIGUSR1 (checkpoint and exit 75), which srun forwards as it is; a SIGTERM would
        # make srun cancel the whole step (SIGKILL after KillWait).
        say "got SIG$1: asking the trainer to checkpoint and stop"
        kill -USR1 "$srun_pid" 2>/dev/null || true
    elif [[ -z "$srun_pid" ]]; then
        say "got SIG$1 before the trainer started: it will not be started"
    else
        say "got SIG$1 after the trainer ended: nothing to do"
    fi
    stop_signal="${stop_signal:-$1}"
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "pretrain.sh: submit me with sbatch (see the top of $0 and cluster/README.md)" >&2
    exit 1
fi

CONFIG="${CONFIG:-configs/pretrain/demo.yaml}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
restarts="${SLURM_RESTART_COUNT:-0}"
if [[ ! "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
    say "ERROR: MAX_RESTARTS must be a whole number >= 0, got '$MAX_RESTARTS'"
    exit "$BAD_CONFIG"
fi
read -r -a trainer <<<"${TRAINER:-python -m megatron_style.train.pretrain}"
# OVERRIDES is split at whitespace; quotes in it would be passed on literally and split a
# value in the middle (run_name="my run" -> 'run_name="my' 'run"'): refuse them.
if [[ "${OVERRIDES:-}" == *[\"\']* ]]; then
    say "ERROR: OVERRIDES is split at whitespace and does not understand quotes: put" \
        "overrides whose values contain spaces in OVERRIDES_FILE (one per line) or pass them" \
        "as arguments after the script name"
    exit "$BAD_CONFIG"
fi
read -r -a overrides <<<"${OVERRIDES:-}"
if [[ -n "${OVERRIDES_FILE:-}" ]]; then
    # One reader for both launch scripts: megatron_style/cli/overrides_file.py.
    mapfile -d '' -O "${#overrides[@]}" overrides < <(python -m megatron_style.cli.overrides_file "$OVERRIDES_FILE")
    wait $! || { say "ERROR: OVERRIDES_FILE: see above"; exit "$BAD_CONFIG"; }
fi
overrides+=("$@")

# Rendezvous from Slurm: rank 0 runs on the first node of the job. The port is derived from
# the job id so that jobs sharing a node do not collide, and stays the same after a requeue.
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if [[ ${#hosts[@]} -eq 0 ]]; then
    say "ERROR: scontrol show hostnames '$SLURM_JOB_NODELIST' listed no hosts"
    exit 1
fi
export MASTER_ADDR="${hosts[0]}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
# sbatch copies the submitting shell's environment: a RANK left there (a torchrun shell)
# would override the per-task SLURM_PROCID the trainer reads when RANK is absent.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE

# GPUs per node as Slurm allocated them ("8" or "a100:8"; unset without GPUs).
gpus="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}"
gpus="${gpus##*:}"
nodes="${SLURM_JOB_NUM_NODES:-1}"
if [[ "$gpus" -gt 0 ]]; then
    per_node="$gpus"
else
    per_node="${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-1} / nodes ))}"
fi
cpus="${SLURM_CPUS_PER_TASK:-1}"
# Torch would start one thread per core in every task; the tasks share the node.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$cpus}"
export PYTHONUNBUFFERED=1

echo "==== $(date '+%F %T') job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${restarts} (at most ${MAX_RESTARTS})"
echo "nodes:  ${nodes} (${SLURM_JOB_NODELIST})"
echo "tasks:  $((per_node * nodes)) ($per_node per node), GPUs per node: $gpus, CPUs per task: $cpus"
echo "master: ${MASTER_ADDR}:${MASTER_PORT}"
echo "config: ${CONFIG}${overrides[0]+$(printf ' %q' "${overrides[@]}")}"
echo "run:    ${trainer[*]}"

# One task: say where it runs (the trainer itself logs on rank 0 only), run the trainer as a
# child and record how it ended. Not `exec`: this shell must see the trainer's status. Slurm
# signals every process of the step (proctrack linuxproc/cgroup; pgid: the process group,
# which this shell shares with the trainer), so the trainer gets SIGUSR1/SIGTERM directly;
# this shell only must not die of them (the traps), and keeps waiting for the real status.
# srun --kill-on-bad-exit ends the step as soon as one task exits non-zero: a rank that failed
# does not leave the others waiting in a collective until the time limit. 75 must not do that
# (the other ranks may still be writing the same checkpoint), so this task exits 0 for it; the
# status file says 75.
# shellcheck disable=SC2317,SC2329  # runs in the tasks (declare -f below)
run_task() {
    echo "task $SLURM_PROCID/$SLURM_NTASKS on ${SLURMD_NODENAME:-$(hostname)} (local rank $SLURM_LOCALID)"
    trap : USR1 TERM
    "$@" &
    local pid=$! rc=0
    # wait returns early (>128) when a trapped signal arrives: keep waiting while the trainer
    # lives, then once more for its real status (bash keeps it for reaped children).
    while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
    wait "$pid" || rc=$?
    if [[ -d "${BEIT3_TASK_STATUS_DIR:-}" ]]; then
        echo "$rc $(date +%s.%N)" >"$BEIT3_TASK_STATUS_DIR/task-$SLURM_PROCID"
    fi
    if [[ $rc -gt 128 ]]; then
        echo "task $SLURM_PROCID: trainer killed by SIG$(kill -l "$((rc - 128))") (status $rc)"
    elif [[ $rc == 75 ]]; then
        echo "task $SLURM_PROCID: trainer exited with status 75 (checkpoint saved)"
    elif [[ $rc != 0 ]]; then
        echo "task $SLURM_PROCID: trainer exited with status $rc"
    fi
    if [[ $rc == 75 ]]; then exit 0; fi
    exit "$rc"
}

# Each task's status, for the tasks on this node (task 0 always is: the batch script runs on
# the first node of the job, and so does task 0). Other nodes have no such directory; their
# tasks' statuses reach this script through srun's (the highest) and their "task N:" lines.
status_dir="$(mktemp -d "${TMPDIR:-/tmp}/beit3-pretrain-${SLURM_JOB_ID}.XXXXXX")"
trap 'rm -rf "$status_dir"' EXIT
export BEIT3_TASK_STATUS_DIR="$status_dir"

srun_rc=0
if [[ -n "$stop_signal" ]]; then
    # Nothing was lost: the latest checkpoint is the one a new run would resume from anyway.
    say "stop requested (SIG$stop_signal) before the trainer started: taken as a preemption" \
        "(status $PREEMPTED) with the latest checkpoint unchanged"
    srun_rc=$PREEMPTED
else
    srun --nodes="$nodes" --ntasks="$((per_node * nodes))" --ntasks-per-node="$per_node" \
        --cpus-per-task="$cpus" --label --kill-on-bad-exit=1 \
        bash -c "$(declare -f run_task); run_task \"\$@\"" \
        task "${trainer[@]}" --config "$CONFIG" "${overrides[@]}" &
    srun_pid=$!
    # wait returns early (>128) when a trapped signal arrives: keep waiting while srun lives,
    # then wait once more for its real status.
    while kill -0 "$srun_pid" 2>/dev/null; do
        wait "$srun_pid" || true
    done
    wait "$srun_pid" || srun_rc=$?
fi

# The run's status: the first task failure (by time) if any, else 75 if the tasks were
# preempted, else srun's.
rc=$srun_rc
first_fail="" first_time="" later=() preempted=0
for f in "$status_dir"/task-*; do
    [[ -e "$f" ]] || continue
    read -r s t <"$f"
    task="${f##*/task-}"
    if [[ $s == "$PREEMPTED" ]]; then
        preempted=1
    elif [[ $s != "$OK" ]]; then
        if [[ -z "$first_time" ]] || [[ "$(printf '%s\n' "$t" "$first_time" | sort -g | head -n 1)" == "$t" ]]; then
            [[ -n "$first_fail" ]] && later+=("$first_fail")
            first_fail="task ${task} (status $s)" first_time="$t" rc="$s"
        else
            later+=("task ${task} (status $s)")
        fi
    fi
done
if [[ -n "$first_fail" ]]; then
    say "$first_fail failed first${later[0]:+ (also failed: ${later[*]})}; srun exited with status $srun_rc"
elif [[ $srun_rc != 0 && $srun_rc != "$PREEMPTED" ]]; then
    say "a task failed that recorded no status here (one on another node, or one killed):" \
        "srun exited with status $srun_rc (see the 'N: task N:' and srun lines above)"
elif [[ $preempted == 1 ]]; then
    rc=$PREEMPTED
elif [[ $srun_rc == 0 ]] && ! compgen -G "$status_dir/task-*" >/dev/null; then
    say "WARNING: no task recorded its status on this node (task 0 runs elsewhere?):" \
        "cannot tell a finished run from a preempted one; taking it as finished"
fi

case "$rc" in
    "$OK")
        say "training finished"
        ;;
    "$PREEMPTED")
        # Only a job that Slurm itself is not ending: after scancel or the time limit its state
        # is COMPLETING, and `scontrol requeue` would still succeed and undo the cancel.
        state="$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'JobState=[A-Z_]*')" || state="?"
        state="${state#JobState=}"
        if [[ "$state" != RUNNING ]]; then
            say "preempted (exit $PREEMPTED) but the job is $state (cancelled or out of time):" \
                "not requeueing; resubmit to resume from the latest checkpoint"
        elif [[ "$restarts" -ge "$MAX_RESTARTS" ]]; then
            say "preempted (exit $PREEMPTED) but the job was already requeued $restarts" \
                "time(s) (MAX_RESTARTS=$MAX_RESTARTS): not requeueing; resubmit the same" \
                "command to resume from the latest checkpoint"
        else
            say "preempted (exit $PREEMPTED, checkpoint saved): requeueing job $SLURM_JOB_ID" \
                "(restart $((restarts + 1)) of at most $MAX_RESTARTS)"
            if scontrol requeue "$SLURM_JOB_ID"; then
                exit 0
            fi
            say "ERROR: requeue failed (JobRequeue=0 on this cluster?);" \
                "resubmit the same command to resume from the checkpoint"
        fi
        ;;
    "$STOPPED")
        say "trainer stopped on a signal without writing a checkpoint (exit $STOPPED," \
            "checkpoint.save=false?): not requeueing, a new run would start from scratch"
        ;;
    "$BAD_CONFIG")
        say "ERROR: the trainer rejected the configuration (exit $BAD_CONFIG, ConfigError above)"
        ;;
    "$NONFINITE")
        say "ERROR: the trainer stopped after repeated non-finite losses (exit $NONFINITE);" \
            "the last good state is in the latest checkpoint: not requeueing"
        ;;
    "$STALLED")
        say "ERROR: the trainer's watchdog found no progress (exit $STALLED, stacks above):" \
            "not requeueing"
        ;;
    *)
        say "ERROR: the run failed with status $rc: not requeueing"
        ;;
esac
exit "$rc"
