"""Loss guards: non-finite losses skip their step (all ranks agree); too many in a row stop the
run; a loss far above its running mean is reported with the batch's sources."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.nn as nn

from megatron_style.config import GuardConfig

#: Tests only: comma-separated steps whose loss becomes NaN on every rank (fault injection).
INJECT_NAN_ENV = "BEIT3_INJECT_NAN_STEPS"


class TooManyNonFinite(RuntimeError):
    """Raised after `max_nonfinite_in_a_row` skipped steps; the last good state is saved."""


@dataclass
class LossGuard:
    cfg: GuardConfig
    skipped_total: int = 0
    skipped_in_a_row: int = 0
    spikes: int = 0
    recent: deque = field(default_factory=deque)

    def check(self, step: int, loss: float, finite: bool) -> Optional[str]:
        """Record one step. Returns a spike message when `loss` is far above the running mean;
        raises TooManyNonFinite when non-finite losses keep coming."""
        if not finite:
            self.skipped_total += 1
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= self.cfg.max_nonfinite_in_a_row:
                raise TooManyNonFinite(
                    f"step {step}: {self.skipped_in_a_row} non-finite losses in a row "
                    f"(guards.max_nonfinite_in_a_row={self.cfg.max_nonfinite_in_a_row}); stopping. "
                    "The checkpoint holds the last good state; lower optim.lr, check the data "
                    "sources logged above, or use bf16/fp32 instead of fp16.")
            return None
        self.skipped_in_a_row = 0
        message = None
        if len(self.recent) >= max(2, self.cfg.spike_window // 4):
            mean = sum(self.recent) / len(self.recent)
            if loss > self.cfg.spike_factor * mean:
                self.spikes += 1
                message = (f"loss spike at step {step}: {loss:.4f} is more than "
                           f"{self.cfg.spike_factor}x the running mean {mean:.4f}")
        self.recent.append(loss)
        while len(self.recent) > self.cfg.spike_window:
            self.recent.popleft()
        return message

    def new_window(self) -> None:
        """Forget the running mean (a stage boundary: other objectives, another loss level)."""
        self.recent.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_total": self.skipped_total, "skipped_in_a_row": self.skipped_in_a_row,
                "spikes": self.spikes, "recent": list(self.recent)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.skipped_total = s["skipped_total"]
        self.skipped_in_a_row = s["skipped_in_a_row"]
        self.spikes = s["spikes"]
        self.recent = deque(s["recent"])


def inject_nan_losses(model: nn.Module, steps: str, current_step: Callable[[], int]) -> None:
    """Fault injection for tests (`INJECT_NAN_ENV`): the loss of each listed step comes out of
    the model's forward as NaN, so the whole path of a real non-finite loss runs (backward,
    agreement, veto). A forward hook, so that the training loop has no test-only branch."""
    bad = {int(x) for x in steps.split(",") if x.strip()}
    if not bad:
        return

    def poison(module, inputs, out):
        if current_step() in bad:
            return out._replace(loss=out.loss * float("nan"))
        return out

    model.register_forward_hook(poison)
