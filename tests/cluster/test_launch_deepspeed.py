"""cluster/launch_deepspeed.sh, the path for clusters without Slurm, on one host with 2 slots.

A one-line hostfile on localhost with --no_ssh_check and MASTER_ADDR given: the DeepSpeed
launcher then starts both ranks locally instead of over ssh (no sshd on a CI machine).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from slurm_cluster import ROOT, STANDIN, STANDIN_CONFIG

LAUNCH = ROOT / "cluster" / "launch_deepspeed.sh"


def test_missing_hostfile_is_a_clear_error(tmp_path):
    env = dict(os.environ, HOSTFILE=str(tmp_path / "nope"))
    r = subprocess.run([str(LAUNCH)], env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "no hostfile at" in r.stderr and "hostfile.example" in r.stderr


@pytest.mark.multiproc
def test_two_ranks_from_a_hostfile(tmp_path):
    if not shutil.which("deepspeed"):
        pytest.skip("the deepspeed launcher is not installed")
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    env = dict(os.environ, HOSTFILE=str(tmp_path / "hostfile"), MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29731", DEEPSPEED_ARGS="--no_ssh_check", OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    r = subprocess.run([str(LAUNCH), "steps=3", "logging.every_steps=1", "data.num_workers=0",
                        "eval_at_end=false", f"checkpoint.dir={tmp_path / 'ckpt'}",
                        f"logging.dir={tmp_path / 'tb'}"],
                       env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "2 rank(s)" in out, out[-4000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "tb" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]
    final = tmp_path / "ckpt" / "step_00000003"
    assert list(final.glob("*zero_pp_rank_1_*")), sorted(os.listdir(final))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def launch(tmp_path):
    """Start launch_deepspeed.sh with the stand-in trainer on a localhost hostfile, 2 ranks,
    in its own session (the test's signals reach only what they are sent to). Whatever of it
    is left at the end is killed: its process group, and any process naming tmp_path."""
    if not shutil.which("deepspeed"):
        pytest.skip("the deepspeed launcher is not installed")
    started = []

    def start(*args: str, **env_vars: str) -> subprocess.Popen:
        (tmp_path / "hostfile").write_text("localhost slots=2\n")
        env = dict(os.environ, HOSTFILE=str(tmp_path / "hostfile"), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()), DEEPSPEED_ARGS="--no_ssh_check",
                   OMP_NUM_THREADS="1", TRAINER=str(STANDIN), CONFIG=str(STANDIN_CONFIG),
                   PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                   **env_vars)
        with open(tmp_path / "launch.log", "w") as log:
            proc = subprocess.Popen([str(LAUNCH), *args], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    for pid in processes_with(str(tmp_path)):
        os.kill(pid, signal.SIGKILL)


def processes_with(text: str) -> list[int]:
    """pids of the processes whose command line contains `text` (the test's own tmp path)."""
    r = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def wait_for(condition, timeout_s: float, proc, log) -> None:
    """Until condition() holds; fails with the launcher's log if `proc` ends or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def stop_and_check(tmp_path, proc: subprocess.Popen, t_signal: float) -> str:
    """Wait for the launch to end after the SIGTERM; no process of it may be left."""
    try:
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        rc = None
    out = (tmp_path / "launch.log").read_text()
    # Nothing of the launch is left: no trainer trains on, orphaned, without the launcher.
    deadline = time.monotonic() + 20
    while processes_with(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = processes_with(str(tmp_path))
    assert not left, f"processes left running: {left} (script exit {rc})\n{out[-3000:]}"
    print(f"stopped {time.monotonic() - t_signal:.1f} s after SIGTERM")
    assert rc == 75, f"exit {rc}\n{out[-3000:]}"
    return out


@pytest.mark.multiproc
def test_sigterm_reaches_every_rank(launch, tmp_path):
    # What a user or a scheduler does: SIGTERM to the process they started. Both ranks must get
    # it, save one checkpoint and exit 75, and the script must exit 75 after them.
    ckpt = tmp_path / "with space" / "ckpt"
    (tmp_path / "overrides.txt").write_text(f"# spaces kept\nrun_name=my run\ncheckpoint.dir={ckpt}\n")
    proc = launch("steps=1000", f"logging.dir={tmp_path / 'tb'}",
                  OVERRIDES_FILE=str(tmp_path / "overrides.txt"))
    metrics = tmp_path / "tb" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 120, proc,
             tmp_path / "launch.log")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = stop_and_check(tmp_path, proc, t0)
    for rank in (0, 1):
        assert re.search(rf"^rank {rank}: SIGTERM -> checkpoint at step \d+, exit 75$", out, re.M), out
    argv = json.loads(re.search(r"^argv: (.*)$", out, re.M).group(1))
    # --local_rank, --config FILE, the file's lines as they are, then the arguments.
    assert argv[3:] == ["run_name=my run", f"checkpoint.dir={ckpt}", "steps=1000",
                        f"logging.dir={tmp_path / 'tb'}"], argv
    assert list(ckpt.glob("step_*/complete")), "no checkpoint written"


@pytest.mark.multiproc
def test_sigterm_during_start_up_is_kept(launch, tmp_path):
    # SIGTERM while the launcher is still starting the ranks: kept, and delivered once the
    # ranks handle it; they stop before their first step with a checkpoint.
    proc = launch("steps=1000", f"checkpoint.dir={tmp_path / 'ckpt'}",
                  f"logging.dir={tmp_path / 'tb'}", STANDIN_START_SECONDS="2")
    log = tmp_path / "launch.log"
    wait_for(lambda: "deepspeed launcher: hosts from" in log.read_text(), 60, proc, log)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = stop_and_check(tmp_path, proc, t0)
    for rank in (0, 1):
        assert re.search(rf"^rank {rank}: SIGTERM -> checkpoint at step 0, exit 75$", out, re.M), out
    assert (tmp_path / "ckpt" / "step_00000000" / "complete").exists()
