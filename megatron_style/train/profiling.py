"""A torch.profiler trace of a few training steps, on the ranks asked for.

    logging:
      profile_at_step: 20      # trace steps 20 .. 20 + profile_steps - 1 (0: off)
      profile_steps: 3
      profile_ranks: [0]

Step profile_at_step - 1 runs under the profiler too, as its warm-up (the first profiled step
carries the profiler's own start-up cost), and is left out of the trace. What is written, in
`logging.dir/profile/`:

  - `rank<r>.<time>.pt.trace.json`: the Chrome trace (open it in Perfetto, chrome://tracing or
    TensorBoard's profiler plugin), with ranges named data / forward / backward / optimizer;
  - `rank<r>_top_ops.txt`: the 25 operators with the most self time over the traced steps;
  - on CUDA, `rank<r>_memory_snapshot.pickle`: every allocation during the traced steps, for
    https://pytorch.org/memory_viz (where the giant's memory goes).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

_TOP_OPS = 25
_MEMORY_EVENTS = 200_000


class StepProfiler:
    """Call `range(name)` around the parts of a step and `step_done(k)` after step k (1-based);
    `close()` at the end. Does nothing unless this rank's trace was asked for."""

    def __init__(self, profile_at_step: int, profile_steps: int, profile_ranks: list[int],
                 out_dir: str, rank: int, device: torch.device, first_step: int,
                 log: Callable[[str], None]) -> None:
        self.enabled = profile_at_step > 0 and rank in profile_ranks
        self.rank, self.device, self.log = rank, device, log
        self.out_dir = os.path.join(out_dir, "profile")
        # The warm-up step is the one before the first traced step; after a resume past that
        # point, the first step run warms up and the traced window moves one step later.
        self.warmup_step = max(profile_at_step - 1, first_step)
        self.last_step = self.warmup_step + profile_steps
        self.steps = profile_steps
        self._prof = None
        self._cuda = device.type == "cuda"

    def range(self, name: str) -> ContextManager:
        return record_function(name) if self._prof is not None else nullcontext()

    def step_begins(self, k: int) -> None:
        if self.enabled and self._prof is None and k == self.warmup_step:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self._cuda else [])
            self._prof = profile(activities=activities, record_shapes=True, profile_memory=True,
                                 schedule=schedule(wait=0, warmup=1, active=self.steps, repeat=1),
                                 on_trace_ready=self._write)
            self._prof.start()
            if self._cuda:
                torch.cuda.memory._record_memory_history(max_entries=_MEMORY_EVENTS)

    def step_done(self, k: int) -> None:
        if self._prof is None:
            return
        self._prof.step()
        if k == self.last_step:
            self.close()

    def _write(self, prof) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        torch.profiler.tensorboard_trace_handler(self.out_dir, worker_name=f"rank{self.rank}")(prof)
        sort = "self_cuda_time_total" if self._cuda else "self_cpu_time_total"
        with open(os.path.join(self.out_dir, f"rank{self.rank}_top_ops.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by=sort, row_limit=_TOP_OPS) + "\n")
        if self._cuda:
            torch.cuda.memory._dump_snapshot(
                os.path.join(self.out_dir, f"rank{self.rank}_memory_snapshot.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        first, last = self.warmup_step + 1, self.last_step
        steps = f"step {first}" if first == last else f"steps {first}-{last}"
        self.log(f"profile of {steps} (rank {self.rank}) written to {self.out_dir}")

    def close(self) -> None:
        """Stop the profiler (a run that ends inside the window still writes what it traced)."""
        prof, self._prof = self._prof, None
        if prof is not None:
            prof.stop()
