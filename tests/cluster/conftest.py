"""Local Slurm clusters for the tests: one node for the session, two nodes (network
namespaces) for the multi-node test only.

cluster/local_slurm.sh installs the Debian packages when they are missing (as root with
apt-get); where that (or creating namespaces) is impossible it exits 3 and the tests using
that cluster skip with its reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from slurm_cluster import LOCAL_SLURM, TEST_PORTS, LocalSlurm


def start_cluster(state: Path, **env_vars: str) -> LocalSlurm:
    if not shutil.which("bash") or os.uname().sysname != "Linux":
        pytest.skip("the local Slurm needs Linux and bash")
    env = dict(os.environ, **env_vars)
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    start = subprocess.run([str(LOCAL_SLURM), "start", str(state)], env=env,
                           capture_output=True, text=True, timeout=900)
    if start.returncode == 3:
        reason = (start.stderr.strip().splitlines() or ["no reason given"])[-1]
        pytest.skip(f"no local Slurm here: {reason}")
    if start.returncode != 0:
        pytest.fail(f"cluster/local_slurm.sh start failed ({start.returncode}):\n"
                    f"{start.stdout}\n{start.stderr}", pytrace=False)
    env["SLURM_CONF"] = str(state / "slurm.conf")
    return LocalSlurm(state, env)


def stop_cluster(cluster: LocalSlurm) -> None:
    subprocess.run([str(LOCAL_SLURM), "stop", str(cluster.dir)], env=cluster.env,
                   capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> LocalSlurm:
    cluster = start_cluster(tmp_path_factory.mktemp("local-slurm"), **TEST_PORTS)
    yield cluster
    stop_cluster(cluster)


@pytest.fixture(scope="module")
def slurm_two_nodes(tmp_path_factory) -> LocalSlurm:
    # Its own ports: the one-node session cluster may be running at the same time.
    cluster = start_cluster(tmp_path_factory.mktemp("local-slurm-2n"), LOCAL_SLURM_NODES="2",
                            LOCAL_SLURM_CTLD_PORT="16917", LOCAL_SLURM_SLURMD_PORT="16918")
    yield cluster
    stop_cluster(cluster)
