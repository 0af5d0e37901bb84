"""Per-step numbers kept on the device until they are reported: the loss record the ranks
agree on once per step, and the per-stream statistics and work counted between log lines."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_style.batch import TARGET_STREAMS, PackedBatch
from megatron_style.model.pretraining import MaskedDataModel


class Accumulator:
    """Per-stream loss/accuracy statistics and work done since the last log line (this rank)."""

    def __init__(self, device: torch.device):
        self.stats = torch.zeros(len(TARGET_STREAMS), 3, dtype=torch.float64, device=device)
        self.counts = torch.zeros(3, dtype=torch.float64)  # samples, tokens, flops

    def add(self, stats: torch.Tensor, b: PackedBatch, flops_fn) -> None:
        self.stats += stats.double()
        self.counts += torch.tensor([b.num_samples, b.num_tokens, flops_fn(b) if flops_fn else 0.0],
                                    dtype=torch.float64)

    def reduce(self, group) -> dict[str, Any]:
        t = torch.cat([self.stats.flatten(), self.counts.to(self.stats.device)])
        dist.all_reduce(t, group=group)
        s = t[:-3].view_as(self.stats).cpu()
        samples, tokens, flops = (float(x) for x in t[-3:])
        return {"stats": s, "samples": samples, "tokens": tokens, "flops": flops}


def loss_record(loss: torch.Tensor) -> torch.Tensor:
    """[loss or 0 if it is not finite, 1, 1 if it is not finite], computed on the device."""
    loss = loss.detach().double().reshape(())
    bad = ~torch.isfinite(loss)
    return torch.stack([torch.where(bad, torch.zeros_like(loss), loss),
                        torch.ones_like(loss), bad.double()])


def flops_function(model: MaskedDataModel):
    """Training FLOPs of a batch, counted from the built model (None if unavailable)."""
    try:
        from megatron_style.model.flops import batch_flops
    except ImportError:
        return None
    return lambda b: batch_flops(model, b)
