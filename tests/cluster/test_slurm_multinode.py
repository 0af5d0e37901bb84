"""A --nodes=2 job across two Slurm nodes that are network namespaces on this machine.

Each node (slurm-n1, slurm-n2) has its own slurmd and address; the ranks rendezvous at the
first node's name and run gloo over the namespaces' interface (GLOO_SOCKET_IFNAME=sl0).
"""
from __future__ import annotations

import os
import re

import pytest

from slurm_cluster import LocalSlurm, trainer_choice

STANDIN = "standin_trainer" in trainer_choice()[0]


@pytest.mark.slurm
def test_two_nodes_train_together(slurm_two_nodes: LocalSlurm, tmp_path):
    cluster = slurm_two_nodes
    job = cluster.submit(tmp_path / "run", ["steps=3", "logging.every_steps=1",
                                            "data.num_workers=0", "eval_at_end=false"],
                         sbatch_args=["--nodes=2", "--ntasks-per-node=1"],
                         env={"GLOO_SOCKET_IFNAME": "sl0"})
    info = cluster.wait(job, timeout=180)
    out = job.output_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", cluster.describe(job)
    assert info["NodeList"] == "slurm-n[1-2]", info
    assert re.search(r"^nodes:\s+2 \(slurm-n\[1-2\]\)", out, re.M), out
    assert re.search(r"^master: slurm-n1:\d+$", out, re.M), out
    # One rank per node, each local rank 0.
    assert re.search(r"^0: task 0/2 on slurm-n1 \(local rank 0\)", out, re.M), out
    assert re.search(r"^1: task 1/2 on slurm-n2 \(local rank 0\)", out, re.M), out
    assert [m["step"] for m in job.metrics()] == [1, 2, 3], cluster.describe(job)
    final = job.run_dir / "ckpt" / "step_00000003"
    if STANDIN:
        assert re.search(r"^1: rank 1/2 step 3 ", out, re.M), out
    else:
        assert "2 rank(s)" in out
        assert list(final.glob("*zero_pp_rank_1_*")), sorted(os.listdir(final))
