"""cluster/pretrain.sh on a real (local, one-node) Slurm: 2 CPU tasks, the tiny demo recipe.

Each test submits with `sbatch` exactly as a user would and checks what Slurm and the trainer
leave behind: job state and exit code, the job's output file, metrics.jsonl, checkpoints,
TensorBoard events. SLURM_TESTS_TRAINER=standin runs the same tests on the stand-in trainer.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import time

import pytest

from slurm_cluster import LOCAL_SLURM, PRETRAIN_SH, Job, LocalSlurm, trainer_choice

STANDIN = "standin_trainer" in trainer_choice()[0]
# Tiny runs: no evaluation, no loader workers, a metrics line for every step.
TINY = ["logging.every_steps=1", "data.num_workers=0", "eval_at_end=false"]


def steps_of(job: Job) -> list[int]:
    return [m["step"] for m in job.metrics()]


def run_seconds(info: dict[str, str]) -> int:
    h, m, s = (int(x) for x in info["RunTime"].split("-")[-1].split(":"))
    return 3600 * h + 60 * m + s


@pytest.mark.slurm
def test_config_error_fails_fast(slurm: LocalSlurm, tmp_path):
    job = slurm.submit(tmp_path / "bad", TINY + ["no_such_key=1"])
    info = slurm.wait(job, timeout=90)
    out = job.output_text()
    assert info["JobState"] == "FAILED", slurm.describe(job)
    assert info["ExitCode"] == "2:0", slurm.describe(job)
    assert info["Restarts"] == "0", "a config error must not requeue"
    assert "ConfigError: no_such_key" in out, slurm.describe(job)
    assert "rejected the configuration" in out
    # Fails before any process group or model exists: seconds, not a rendezvous timeout.
    assert run_seconds(info) <= 30, info["RunTime"]


@pytest.mark.slurm
def test_two_ranks_train_checkpoint_and_log(slurm: LocalSlurm, tmp_path):
    job = slurm.submit(tmp_path / "run", TINY + ["steps=4", "checkpoint.every_steps=2"])
    info = slurm.wait(job, timeout=240)
    out = job.output_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", slurm.describe(job)

    # The header, then one start line per task (srun --label prefixes "<task>: ").
    port = 20000 + int(job.id) % 20000
    assert f"job {job.id} (beit3-pretrain) restart 0" in out
    assert re.search(r"^tasks:\s+2 \(2 per node\), GPUs per node: 0", out, re.M), out
    assert re.search(rf"^master: \S+:{port}$", out, re.M), out
    assert f"config: {trainer_choice()[1]}" in out
    for rank in (0, 1):
        assert re.search(rf"^{rank}: task {rank}/2 on \S+ \(local rank {rank}\)", out, re.M), out
    assert "training finished" in out

    assert steps_of(job) == [1, 2, 3, 4], slurm.describe(job)
    assert all(math.isfinite(m["loss"]) for m in job.metrics())
    assert list((job.run_dir / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"
    final = job.run_dir / "ckpt" / "step_00000004"
    assert final.is_dir(), sorted(os.listdir(job.run_dir / "ckpt"))
    # Rank 1 took part to the end: it logs its own steps (stand-in) or wrote its own
    # ZeRO optimizer partition into the final checkpoint (trainer).
    if STANDIN:
        assert re.search(r"^1: rank 1/2 step 4 ", out, re.M), out
    else:
        assert list(final.glob("*zero_pp_rank_1_*")), sorted(os.listdir(final))


@pytest.mark.slurm
def test_preemption_checkpoints_requeues_and_resumes(slurm: LocalSlurm, tmp_path):
    steps = 25 if STANDIN else 30
    # No periodic checkpoint before the end: the resume can only come from the one the
    # preemption signal made.
    job = slurm.submit(tmp_path / "pre", TINY + [f"steps={steps}", "checkpoint.every_steps=1000"])
    slurm.wait(job, timeout=180, until=lambda info: len(job.metrics()) >= 2)
    assert len(job.metrics()) < steps, "the run ended before the test could preempt it"
    # What Slurm sends before the time limit (--signal=USR1@300), here right away.
    slurm.run("scancel", "--signal=USR1", job.id)
    info = slurm.wait(job, timeout=240)
    out = job.output_text()

    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", slurm.describe(job)
    assert info["Restarts"] == "1", slurm.describe(job)
    assert f"requeueing job {job.id}" in out
    assert f"job {job.id} (beit3-pretrain) restart 1" in out
    resumed = re.search(r"resumed from (\S+) at step (\d+)", out)
    assert resumed, out
    at = int(resumed.group(2))
    assert 2 <= at < steps and resumed.group(1).endswith(f"step_{at:08d}")
    # The loss history across both runs: every step exactly once, in order.
    assert steps_of(job) == list(range(1, steps + 1)), slurm.describe(job)
    assert all(math.isfinite(m["loss"]) for m in job.metrics())


@pytest.mark.slurm
def test_cancel_stops_for_good(slurm: LocalSlurm, tmp_path):
    # scancel sends SIGTERM: the trainer still saves and exits 75, but the job must not come
    # back (`scontrol requeue` would accept the cancelled, still completing job).
    job = slurm.submit(tmp_path / "cancel", TINY + ["steps=1000", "checkpoint.every_steps=1000"])
    slurm.wait(job, timeout=180, until=lambda info: len(job.metrics()) >= 1)
    slurm.run("scancel", job.id)
    deadline = time.monotonic() + 30
    while "not requeueing" not in job.output_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "not requeueing" in job.output_text(), slurm.describe(job)
    time.sleep(2)
    info = slurm.job_info(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", slurm.describe(job)


@pytest.mark.slurm
def test_local_slurm_start_is_idempotent(slurm: LocalSlurm):
    t0 = time.monotonic()
    again = slurm.run(str(LOCAL_SLURM), "start", str(slurm.dir))
    assert "already running" in again.stderr and time.monotonic() - t0 < 20
    status = slurm.run(str(LOCAL_SLURM), "status", str(slurm.dir))
    assert "slurmctld: running" in status.stdout and " idle " in status.stdout, status.stdout


def test_pretrain_sh_refuses_to_run_outside_a_job():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(PRETRAIN_SH)], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "submit me with sbatch" in r.stderr
