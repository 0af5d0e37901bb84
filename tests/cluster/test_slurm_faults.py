"""cluster/pretrain.sh under faults, on the real local Slurm with the stand-in trainer.

Every fault is real: sbatch jobs, `scancel --signal`, ranks that exit with a status or hang
(tests/cluster/standin_trainer.py injects them from STANDIN_* variables in the job's
environment). The checks are what a user would look at: the job's state, exit code and
restart count (`scontrol show job`), its output file, its run time.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from slurm_cluster import PRETRAIN_SH, ROOT, Job, LocalSlurm

LAUNCH = ROOT / "cluster" / "launch_deepspeed.sh"


def run_seconds(info: dict[str, str]) -> int:
    h, m, s = (int(x) for x in info["RunTime"].split("-")[-1].split(":"))
    return 3600 * h + 60 * m + s


def restarts(info: dict[str, str]) -> int:
    return int(info.get("Restarts", "0"))


def finish(slurm: LocalSlurm, job: Job, timeout: float, max_restarts: int) -> dict[str, str]:
    """Wait for the job's end, but give up as soon as it was requeued more often than it may
    be (a script that requeues forever would otherwise keep the test waiting)."""
    try:
        return slurm.wait(job, timeout=timeout, until=lambda i: restarts(i) > max_restarts)
    finally:
        if slurm.job_info(job).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED"):
            slurm.run("scancel", job.id, check=False)


@pytest.mark.slurm
def test_stopped_without_checkpoint_is_not_requeued(slurm: LocalSlurm, tmp_path):
    # checkpoint.save=false: asked to stop, the trainer has nothing to resume from and exits 4.
    # A requeue would start the run from scratch, again and again.
    job = slurm.submit(tmp_path / "nosave", ["steps=1000", "checkpoint.save=false"], standin=True)
    slurm.wait(job, timeout=120, until=lambda info: len(job.metrics()) >= 1)
    slurm.run("scancel", "--signal=USR1", job.id)
    info = finish(slurm, job, timeout=90, max_restarts=0)
    out = job.output_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "4:0", slurm.describe(job)
    assert restarts(info) == 0, slurm.describe(job)
    assert "stopped on a signal without writing a checkpoint (exit 4" in out, out
    assert "not requeueing, a new run would start from scratch" in out, out
    assert not (job.run_dir / "ckpt").exists()


@pytest.mark.slurm
def test_a_failed_task_is_not_hidden_behind_another_tasks_75(slurm: LocalSlurm, tmp_path):
    # Rank 1 fails (exit 1) at the step where rank 0 exits 75: srun's own status would be 75,
    # the highest, and the job would be requeued as if it had been preempted.
    job = slurm.submit(tmp_path / "mixed", ["steps=1000"], standin=True,
                       env={"STANDIN_EXIT": "1:1@3,0:75@3"})
    info = finish(slurm, job, timeout=120, max_restarts=0)
    out = job.output_text()
    assert restarts(info) == 0, "a failed rank must not requeue the job\n" + slurm.describe(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", slurm.describe(job)
    assert re.search(r"^1: task 1: trainer exited with status 1$", out, re.M), out
    assert "pretrain.sh: task 1 (status 1) failed first" in out, out
    assert "the run failed with status 1: not requeueing" in out, out


@pytest.mark.slurm
def test_a_dead_rank_ends_the_job_in_seconds(slurm: LocalSlurm, tmp_path):
    # Rank 1 exits 1 while rank 0 stays in its step (as a rank in an NCCL collective whose
    # peer died: it waits for the collective's timeout). Without --kill-on-bad-exit the job
    # would hold its nodes until the time limit (10 minutes here).
    job = slurm.submit(tmp_path / "dead", ["steps=1000"], standin=True,
                       env={"STANDIN_EXIT": "1:1@3", "STANDIN_HANG": "0@3"})
    t0 = time.monotonic()
    info = finish(slurm, job, timeout=90, max_restarts=0)
    out = job.output_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", slurm.describe(job)
    assert "injected hang at step 3" in out and "task 1 (status 1) failed first" in out, out
    # The step ends at once; rank 0 ignores SIGTERM and is killed KillWait (10 s) later.
    assert run_seconds(info) <= 60, (info["RunTime"], slurm.describe(job))
    print(f"dead rank: job ran {info['RunTime']}, test waited {time.monotonic() - t0:.0f} s")


@pytest.mark.slurm
def test_restart_cap_stops_a_preemption_loop(slurm: LocalSlurm, tmp_path):
    # Both ranks exit 75 at step 2 of every run: preempted over and over. MAX_RESTARTS=1: one
    # requeue, then the job stops with a line that says why.
    job = slurm.submit(tmp_path / "loop", ["steps=1000"], standin=True,
                       env={"STANDIN_EXIT": "0:75@2,1:75@2", "MAX_RESTARTS": "1"})
    info = finish(slurm, job, timeout=180, max_restarts=1)
    out = job.output_text()
    assert restarts(info) == 1, slurm.describe(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", slurm.describe(job)
    assert f"requeueing job {job.id} (restart 1 of at most 1)" in out, out
    assert "already requeued 1 time(s) (MAX_RESTARTS=1): not requeueing" in out, out


@pytest.mark.slurm
def test_overrides_file_keeps_spaces(slurm: LocalSlurm, tmp_path):
    run = tmp_path / "spaces"
    where = run / "with space"
    (tmp_path / "overrides.txt").write_text(
        "# one override per line, taken as it is\n"
        "\n"
        "run_name=my run\n"
        f"  checkpoint.dir={where / 'ckpt'}  \n"
        f"logging.dir={where / 'tb'}\n")
    job = slurm.submit(run, ["steps=2", "run_name=my other run"], standin=True, dirs=False,
                       env={"OVERRIDES": "logging.every_steps=1",
                            "OVERRIDES_FILE": str(tmp_path / "overrides.txt")})
    info = slurm.wait(job, timeout=120)
    out = job.output_text()
    assert info["JobState"] == "COMPLETED", slurm.describe(job)
    argv = json.loads(re.search(r"^0: argv: (.*)$", out, re.M).group(1))
    # OVERRIDES, then the file's lines (trimmed), then the script's arguments.
    assert argv[2:] == ["logging.every_steps=1", "run_name=my run",
                        f"checkpoint.dir={where / 'ckpt'}", f"logging.dir={where / 'tb'}",
                        "steps=2", "run_name=my other run"], argv
    assert (where / "ckpt" / "step_00000002" / "complete").exists(), out
    assert (where / "tb" / "metrics.jsonl").exists(), out
    # The header shows the overrides as the trainer gets them.
    assert r"run_name=my\ run" in out, out


@pytest.mark.slurm
def test_signal_before_the_trainer_starts(slurm: LocalSlurm, tmp_path):
    # The batch shell gets SIGUSR1 (what --signal=B:USR1@.. or `scancel --batch` send) while it
    # is still setting up, before srun: a `scontrol` first in PATH that takes its time there.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "in-scontrol"
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        f'if [[ "$1 $2" == "show hostnames" ]]; then touch {marker}; sleep 4; fi\n'
        'exec /usr/bin/scontrol "$@"\n')
    (bin_dir / "scontrol").chmod(0o755)
    job = slurm.submit(tmp_path / "early", ["steps=3"], standin=True,
                       env={"PATH": f"{bin_dir}:{slurm.env['PATH']}"})
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline, slurm.describe(job)
        time.sleep(0.1)
    slurm.run("scancel", "--batch", "--signal=USR1", job.id)
    info = finish(slurm, job, timeout=150, max_restarts=1)
    out = job.output_text()
    # Not killed by the signal: the trainer is not started, the job is requeued (nothing was
    # lost), and the next run trains to the end.
    assert info["JobState"] == "COMPLETED" and restarts(info) == 1, slurm.describe(job)
    first_run = out.split("restart 1 (at most")[0]
    assert "got SIGUSR1 before the trainer started: it will not be started" in first_run, out
    assert "task 0/2" not in first_run, out
    assert "0: rank 0: finished at step 3" in out, out


@pytest.mark.parametrize("script", ["pretrain.sh", "launch_deepspeed.sh"])
def test_quotes_in_overrides_are_refused(script, tmp_path):
    # Split at whitespace, run_name="my run" would reach the trainer as two broken overrides.
    (tmp_path / "hostfile").write_text("localhost slots=1\n")
    env = dict(os.environ, SLURM_JOB_ID="1", HOSTFILE=str(tmp_path / "hostfile"),
               OVERRIDES='steps=3 run_name="my run"')
    path = PRETRAIN_SH if script == "pretrain.sh" else LAUNCH
    if script == "launch_deepspeed.sh" and not shutil.which("deepspeed"):
        pytest.skip("the deepspeed launcher is not installed")
    r = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, cwd=ROOT,
                       timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "does not understand quotes" in r.stdout + r.stderr
    assert "OVERRIDES_FILE" in r.stdout + r.stderr


def test_overrides_file_must_exist(tmp_path):
    env = dict(os.environ, SLURM_JOB_ID="1", OVERRIDES_FILE=str(tmp_path / "nope.txt"))
    r = subprocess.run(["bash", str(PRETRAIN_SH)], env=env, capture_output=True, text=True,
                       cwd=ROOT, timeout=30)
    assert r.returncode == 2 and "nope.txt' cannot be read" in r.stdout + r.stderr, r.stdout + r.stderr


def test_max_restarts_must_be_a_number(tmp_path):
    env = dict(os.environ, SLURM_JOB_ID="1", MAX_RESTARTS="lots")
    r = subprocess.run(["bash", str(PRETRAIN_SH)], env=env, capture_output=True, text=True,
                       cwd=ROOT, timeout=30)
    assert r.returncode == 2 and "MAX_RESTARTS must be a whole number" in r.stdout, r.stdout
