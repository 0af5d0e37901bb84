"""A rank that fails ends the whole job within seconds, with the failing rank and the cause in
the log; a rank that stalls is ended by the watchdog with every thread's stack. Before, the
failing rank waited for the others in a barrier and the job hung, silent, until DeepSpeed's
30-minute timeout."""
import os
import signal
import time

import pytest

from fault_launch import DEMO_TINY, TINY, Run
from tests.train.launch import run_dirs

pytestmark = [pytest.mark.faults, pytest.mark.multiproc]

#: Generous for a loaded 2-core CI machine: the fault itself is detected within seconds.
END_WITHIN_S = 120


def test_a_killed_loader_worker_ends_the_job_fast(tmp_path):
    run = Run([*DEMO_TINY, *run_dirs(tmp_path), "steps=100000", "checkpoint.every_steps=100000"],
              tmp_path, ranks=2)
    run.wait_for_line("step 3/", timeout=600)  # both ranks train, their workers deliver
    workers = run.workers(1)
    assert workers, run.output[-3000:]
    os.kill(workers[0].pid, signal.SIGKILL)
    t_kill = time.monotonic()
    code = run.wait(timeout=END_WITHIN_S)
    out = run.output
    print(f"killed worker -> job ended in {time.monotonic() - t_kill:.1f} s, status {code}")
    assert code == 1, out[-4000:]
    assert "rank 1: FAILED" in out and "DataLoader worker" in out, out[-4000:]
    failed_line = next(line for line in out.splitlines() if line.startswith("rank 1: FAILED"))
    assert "the data loader failed on this rank" in failed_line, failed_line
    assert not [p for p in run.tree() if p.is_running()], "trainer processes outlived the job"


def test_a_stalled_rank_is_ended_by_the_watchdog(tmp_path):
    run = Run([*TINY, *run_dirs(tmp_path), "steps=100000", "checkpoint.every_steps=100000",
               "guards.stall_timeout_s=20"], tmp_path, ranks=2)
    run.wait_for_line("step 3/", timeout=600)
    trainers = run.trainers()
    os.kill(trainers[1].pid, signal.SIGSTOP)  # a hung node: the process is frozen, not gone
    t_stop = time.monotonic()
    code = run.wait(timeout=END_WITHIN_S)
    print(f"frozen rank -> job ended in {time.monotonic() - t_stop:.1f} s, status {code}")
    out = run.output
    assert code == 124, out[-4000:]
    assert "rank 0: WATCHDOG: no progress for" in out and "phase 'step" in out, out[-4000:]
    assert "Thread 0x" in out or "Current thread" in out, "no stacks dumped"
