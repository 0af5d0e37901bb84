"""Learning rate: linear warmup, then cosine decay to min_lr_ratio * lr at the last step.

A pure function of the step, so resuming needs no scheduler state and a skipped step (a
non-finite loss) does not desynchronise anything."""
from __future__ import annotations

import math

from megatron_style.config import OptimConfig


def learning_rate(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """LR for optimizer step `step` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
