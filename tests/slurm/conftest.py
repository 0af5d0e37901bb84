"""One local Slurm (munged, slurmctld, slurmd) for the whole test session.

cluster/local_slurm.sh installs the Debian packages when they are missing (as root with
apt-get); where that is impossible it exits 3 and every Slurm test skips with its reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from slurm_cluster import LOCAL_SLURM, TEST_PORTS, LocalSlurm


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> LocalSlurm:
    if not shutil.which("bash") or os.uname().sysname != "Linux":
        pytest.skip("the local Slurm needs Linux and bash")
    state = tmp_path_factory.mktemp("local-slurm")
    env = dict(os.environ, **TEST_PORTS)
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    start = subprocess.run([str(LOCAL_SLURM), "start", str(state)], env=env,
                           capture_output=True, text=True, timeout=900)
    if start.returncode == 3:
        reason = (start.stderr.strip().splitlines() or ["no reason given"])[-1]
        pytest.skip(f"Slurm is not installed and cannot be installed here: {reason}")
    if start.returncode != 0:
        pytest.fail(f"cluster/local_slurm.sh start failed ({start.returncode}):\n"
                    f"{start.stdout}\n{start.stderr}", pytrace=False)
    env["SLURM_CONF"] = str(state / "slurm.conf")
    cluster = LocalSlurm(state, env)
    yield cluster
    subprocess.run([str(LOCAL_SLURM), "stop", str(state)], env=env, capture_output=True,
                   text=True, timeout=120)
