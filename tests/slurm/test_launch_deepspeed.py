"""cluster/launch_deepspeed.sh, the path for clusters without Slurm, on one host with 2 slots.

A one-line hostfile on localhost with --no_ssh_check and MASTER_ADDR given: the DeepSpeed
launcher then starts both ranks locally instead of over ssh (no sshd on a CI machine).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from slurm_cluster import ROOT

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
