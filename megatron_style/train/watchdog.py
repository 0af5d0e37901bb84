"""The step watchdog: a run that stops making progress ends loudly instead of hanging.

A stalled collective (a rank gone silent), a hung file system or a data source that never
answers would otherwise keep a job alive, and its GPUs busy, until the launcher's or the
process group's timeout (30 minutes of nothing in the log at best, the whole allocation at
worst). The trainer calls `beat(phase)` at every step and phase change (start-up, resume,
checkpoint, evaluation); a daemon thread checks that the last beat is younger than
`guards.stall_timeout_s`. When it is not, it prints which phase stalled, for how long, every
thread's stack (faulthandler, which works even when the main thread is stuck in C code), and
ends the process with STALLED (124) without running cleanup that could hang too.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import Callable, Optional

from megatron_style.train.exit_codes import STALLED


class Watchdog:
    def __init__(self, timeout_s: float, rank: int = 0,
                 exit_fn: Callable[[int], None] = os._exit) -> None:
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self.exit_fn = exit_fn
        self.phase = "start-up"
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def beat(self, phase: Optional[str] = None) -> None:
        self.last = time.monotonic()
        if phase is not None:
            self.phase = phase

    def start(self) -> "Watchdog":
        if self.timeout_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="beit3-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        period = max(0.05, min(10.0, self.timeout_s / 10))
        while not self._stop.wait(period):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                self._fire(idle)
                return

    def _fire(self, idle: float) -> None:
        err = sys.stderr
        print(f"rank {self.rank}: WATCHDOG: no progress for {idle:.0f} s in phase "
              f"'{self.phase}' (guards.stall_timeout_s={self.timeout_s:g}); the stacks of "
              f"every thread follow, then the run ends with status {STALLED}", file=err, flush=True)
        try:
            faulthandler.dump_traceback(file=err, all_threads=True)
        except (OSError, ValueError):
            pass
        err.flush()
        self.exit_fn(STALLED)
