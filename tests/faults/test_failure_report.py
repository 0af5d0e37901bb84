"""A failing rank always ends with its `rank N: FAILED: ...` line and status 1, even when
something raises again while the failure is being reported. The CI once saw rank 1 of a run
whose loader worker was killed exit with status 1 and no FAILED line: torch's DataLoader
SIGCHLD handler raises each time a child exits while a dead worker is registered, and Python
runs it between any two bytecodes, the report's included."""
import subprocess
import sys
import textwrap

import pytest

from tests.train.launch import ROOT

pytestmark = pytest.mark.faults


def _report(body: str) -> subprocess.CompletedProcess:
    """Run `body` in a fresh interpreter, then megatron_style.train.pretrain.fail(3, err)."""
    code = textwrap.dedent("""
        import signal, subprocess, sys, traceback
        from megatron_style.train import pretrain
    """) + textwrap.dedent(body) + "\npretrain.fail(3, err)\n"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def _last_line(p: subprocess.CompletedProcess) -> str:
    return p.stderr.strip().splitlines()[-1]


def test_a_child_exiting_during_the_report_does_not_lose_the_failed_line():
    # torch's handler, in effect: raise on every SIGCHLD. A child then exits in the middle of
    # formatting the traceback, as a loader's other workers do while the exception unwinds.
    p = _report("""
        def handler(signum, frame):
            raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Killed.")
        signal.signal(signal.SIGCHLD, handler)
        real_format = traceback.format_exception
        def format_with_a_child_exit(*a, **k):
            subprocess.run(["true"])  # its exit is a SIGCHLD, handled between two bytecodes
            return real_format(*a, **k)
        traceback.format_exception = format_with_a_child_exit
        try:
            raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Killed.")
        except RuntimeError as e:
            err = e
    """)
    assert p.returncode == 1, p.stderr
    assert _last_line(p).startswith(
        "rank 3: FAILED: RuntimeError: DataLoader worker (pid 12345) is killed"), p.stderr
    assert "the data loader failed on this rank" in _last_line(p), p.stderr
    assert "Traceback (most recent call last)" in p.stderr  # the report itself went out too


def test_an_exception_that_cannot_be_printed_still_gives_the_line_and_status():
    p = _report("""
        class Unprintable(Exception):
            def __str__(self):
                raise ValueError("no text for this one")
        err = Unprintable()
    """)
    assert p.returncode == 1, p.stderr
    assert _last_line(p) == "rank 3: FAILED: Unprintable", p.stderr


def test_the_summary_says_which_side_failed():
    collective = _report("""
        err = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    """)
    assert collective.returncode == 1
    assert "a collective failed: another rank probably failed first" in _last_line(collective)
    # A loader worker's socket reset is this rank's own failure, not a peer's, although the
    # text matches the collective one.
    loader = _report("""
        import multiprocessing.connection
        def recv_from_a_dead_worker():
            raise ConnectionResetError(104, "Connection reset by peer")
        try:
            recv_from_a_dead_worker.__code__ = recv_from_a_dead_worker.__code__.replace(
                co_filename=multiprocessing.connection.__file__)
            recv_from_a_dead_worker()
        except ConnectionResetError as e:
            err = e
    """)
    assert loader.returncode == 1
    assert "the data loader failed on this rank" in _last_line(loader), loader.stderr
    assert "another rank probably failed first" not in _last_line(loader)


def test_a_config_error_found_late_exits_with_the_config_status():
    p = _report("""
        from megatron_style.config import ConfigError
        err = ConfigError("parallel.tp_size: 3 does not divide the 2 ranks")
    """)
    assert p.returncode == 2, p.stderr
    assert _last_line(p) == "ConfigError: parallel.tp_size: 3 does not divide the 2 ranks"
