"""Stop requests: SIGUSR1 (Slurm's warning before the time limit) and SIGTERM (preemption,
`scancel`, the launcher passing on a stop) ask the trainer to finish its step, save and exit.

Installed first thing in the entry point, before anything slow (imports, the process group,
building the model, loading a checkpoint), so that a signal arriving during start-up is
recorded instead of killing the process with the default action; the trainer looks at the
request before the first step and at the end of every step (the ranks agree on it).
"""
from __future__ import annotations

import signal
import time
from typing import Optional

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self.at: Optional[float] = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        if self.signal is None:
            self.signal, self.at = signum, time.monotonic()

    def describe(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "none"
