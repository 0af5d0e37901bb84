"""Drive the local Slurm of cluster/local_slurm.sh from tests: submit, watch, read results."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCAL_SLURM = ROOT / "cluster" / "local_slurm.sh"
PRETRAIN_SH = ROOT / "cluster" / "pretrain.sh"
STANDIN = Path(__file__).resolve().parent / "standin_trainer.py"
STANDIN_CONFIG = Path(__file__).resolve().parent / "standin.yaml"
DEMO_CONFIG = ROOT / "configs" / "pretrain" / "demo.yaml"

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
# Ports of the test cluster: apart from Slurm's defaults (6817/6818) so that a local Slurm
# someone started by hand for trying the scripts does not collide with the tests'.
TEST_PORTS = {"LOCAL_SLURM_CTLD_PORT": "16817", "LOCAL_SLURM_SLURMD_PORT": "16818"}


def trainer_choice(standin: bool = False) -> tuple[str, str]:
    """(TRAINER command, CONFIG file) of the end-to-end runs.

    The real trainer on the demo recipe; SLURM_TESTS_TRAINER=standin switches to the stand-in,
    which follows the same contract in a fraction of the time (for working on the scripts).
    `standin=True`: always the stand-in (the fault tests inject its faults)."""
    if standin or os.environ.get("SLURM_TESTS_TRAINER", "real") == "standin":
        return f"{sys.executable} {STANDIN}", str(STANDIN_CONFIG)
    return f"{sys.executable} -m megatron_style.train.pretrain", str(DEMO_CONFIG)


@dataclass
class Job:
    id: str
    run_dir: Path

    @property
    def output(self) -> Path:
        # pretrain.sh's default: --output=%x-%j.out in the directory sbatch ran in.
        return self.run_dir / f"beit3-pretrain-{self.id}.out"

    def output_text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else "(no output file)"

    def metrics(self) -> list[dict]:
        path = self.run_dir / "tb" / "metrics.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


class LocalSlurm:
    def __init__(self, state_dir: Path, env: dict[str, str]):
        self.dir = state_dir
        self.env = env

    def run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(list(args), env=kw.pop("env", self.env), capture_output=True,
                           text=True, timeout=kw.pop("timeout", 60), **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def submit(self, run_dir: Path, overrides: list[str], sbatch_args: list[str] = (),
               env: dict[str, str] | None = None, standin: bool = False,
               dirs: bool = True) -> Job:
        """`sbatch cluster/pretrain.sh` on 2 CPU tasks from run_dir, as a user would.

        `env` goes into the job's environment (sbatch exports it to the script and the tasks,
        and keeps it for a requeued run)."""
        trainer, config = trainer_choice(standin)
        run_dir.mkdir(parents=True, exist_ok=True)
        job_env = dict(self.env, TRAINER=trainer, CONFIG=config, **(env or {}))
        # dirs=False: the test names checkpoint.dir and logging.dir itself.
        where = [f"checkpoint.dir={run_dir / 'ckpt'}", f"logging.dir={run_dir / 'tb'}"] if dirs else []
        out = self.run("sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2",
                       "--cpus-per-task=1", "--time=10", *sbatch_args, str(PRETRAIN_SH),
                       *where, *overrides, env=job_env, cwd=run_dir)
        return Job(out.stdout.strip().split(";")[0], run_dir)

    def job_info(self, job: Job) -> dict[str, str]:
        r = self.run("scontrol", "show", "job", "-o", job.id)
        return dict(re.findall(r"(\S+?)=(\S*)", r.stdout))

    def wait(self, job: Job, timeout: float, until=None) -> dict[str, str]:
        """Poll until the job reached a final state (or `until(info)` holds); return its info.

        A requeued job waits 2 minutes (its BeginTime) before Slurm starts it again; the tests
        release it earlier with `scontrol update StartTime=...` (an operator could do the same)."""
        deadline = time.monotonic() + timeout
        released = set()
        while True:
            info = self.job_info(job)
            if until is not None and until(info):
                return info
            if info.get("JobState") in FINAL_STATES:
                return info
            restarts = info.get("Restarts", "0")
            if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime" \
                    and restarts not in released and self.nodes_idle():
                # Not sooner: slurmd revokes the old run's credential when it has cleaned up
                # (node no longer completing), with a 1 s clock; a run started in that same
                # second is refused ("Job credential revoked") and the job FAILS.
                released.add(restarts)
                self.run("scontrol", "update", f"JobId={job.id}", "StartTime=now+2")
            if time.monotonic() > deadline:
                self.run("scancel", job.id, check=False)
                raise AssertionError(f"job {job.id} not done after {timeout:.0f} s: {info}\n"
                                     f"{self.describe(job)}")
            time.sleep(0.3)

    def nodes_idle(self) -> bool:
        states = self.run("sinfo", "-h", "-N", "-o", "%T").stdout.split()
        return bool(states) and all(st == "idle" for st in states)

    def describe(self, job: Job) -> str:
        """Everything useful when a test fails: the job's output and the daemons' logs."""
        parts = [f"----- {job.output} -----", job.output_text()[-6000:]]
        for name in ("slurmctld.log", "slurmd.log"):
            log = self.dir / "log" / name
            if log.exists():
                parts += [f"----- {log} (tail) -----", "\n".join(log.read_text().splitlines()[-20:])]
        return "\n".join(parts)
