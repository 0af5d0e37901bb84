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
#   CONFIG       recipe, relative to the directory sbatch ran in (default configs/pretrain/demo.yaml)
#   OVERRIDES    more key.sub=value overrides, space-separated (script arguments come after them)
#   TRAINER      the training command (default: python -m megatron_style.train.pretrain)
#   MASTER_PORT  rendezvous port (default: 20000 + job id % 20000, the same after a requeue)
# One task per GPU: with GPUs, srun starts --gpus-per-node tasks per node; with 0 GPUs (CPU,
# gloo) it starts --ntasks-per-node tasks. The trainer exits 75 after saving a checkpoint when
# it receives SIGUSR1 (sent 300 s before the time limit) or SIGTERM; this script then requeues
# the job, and the next run resumes from that checkpoint.
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

PREEMPTED=75
say() { echo "pretrain.sh: $*"; }

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "pretrain.sh: submit me with sbatch (see the top of $0 and cluster/README.md)" >&2
    exit 1
fi

CONFIG="${CONFIG:-configs/pretrain/demo.yaml}"
read -r -a trainer <<<"${TRAINER:-python -m megatron_style.train.pretrain}"
read -r -a overrides <<<"${OVERRIDES:-}"
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

echo "==== $(date '+%F %T') job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}"
echo "nodes:  ${nodes} (${SLURM_JOB_NODELIST})"
echo "tasks:  $((per_node * nodes)) ($per_node per node), GPUs per node: $gpus, CPUs per task: $cpus"
echo "master: ${MASTER_ADDR}:${MASTER_PORT}"
echo "config: ${CONFIG} ${overrides[*]}"
echo "run:    ${trainer[*]}"

# srun's own exit status is the highest of the tasks'. --kill-on-bad-exit is deliberately
# off: it would SIGTERM the other ranks as soon as the first exits 75 and turn 75 into 143.
# Each task prints where it runs (the trainer itself logs on rank 0 only), then becomes the
# trainer (exec: signals reach it directly).
# shellcheck disable=SC2016  # expanded by the task's bash, not here
srun --nodes="$nodes" --ntasks="$((per_node * nodes))" --ntasks-per-node="$per_node" \
    --cpus-per-task="$cpus" --label \
    bash -c 'echo "task $SLURM_PROCID/$SLURM_NTASKS on ${SLURMD_NODENAME:-$(hostname)} (local rank $SLURM_LOCALID)"; exec "$@"' \
    task "${trainer[@]}" --config "$CONFIG" "${overrides[@]}" &
srun_pid=$!

# The batch shell itself gets signals too (scancel --batch, --signal=B:USR1@.., preemption).
# Pass them to the tasks as SIGUSR1 (checkpoint and exit 75), which srun forwards as it is;
# a SIGTERM would make srun cancel the whole step (SIGKILL after KillWait). The traps stay
# after srun ends: a late signal must not kill this shell before it requeues.
# shellcheck disable=SC2317  # called from the traps
forward() { say "got SIG$1: asking the trainer to checkpoint and stop"; kill -USR1 "$srun_pid" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# wait returns early (>128) when a trapped signal arrives: keep waiting while srun lives,
# then wait once more for its real status (bash keeps it for reaped children).
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid" || true
done
rc=0
wait "$srun_pid" || rc=$?

case "$rc" in
    0)
        say "training finished"
        ;;
    "$PREEMPTED")
        # Only a job that Slurm itself is not ending: after scancel or the time limit its state
        # is COMPLETING, and `scontrol requeue` would still succeed and undo the cancel.
        state="$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'JobState=[A-Z_]*')" || state="?"
        state="${state#JobState=}"
        if [[ "$state" != RUNNING ]]; then
            say "trainer stopped with a checkpoint (exit $PREEMPTED) but the job is $state" \
                "(cancelled or out of time): not requeueing; resubmit to resume"
        else
            say "trainer preempted (exit $PREEMPTED, checkpoint saved): requeueing job $SLURM_JOB_ID"
            if scontrol requeue "$SLURM_JOB_ID"; then
                exit 0
            fi
            say "ERROR: requeue failed (JobRequeue=0 on this cluster?);" \
                "resubmit the same command to resume from the checkpoint"
        fi
        ;;
    2)
        say "ERROR: the trainer rejected the configuration (exit 2, ConfigError above)"
        ;;
    *)
        say "ERROR: srun exited with status $rc"
        ;;
esac
exit "$rc"
