"""Per-step numbers kept on the device until they are reported: the loss record the ranks
agree on once per step, and the per-stream statistics and work counted between log lines."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_style.batch import TARGET_STREAMS, PackedBatch
from megatron_style.model.pretraining import OBJECTIVE_STATS, MaskedDataModel, MDMOutput


class Accumulator:
    """Per-stream loss/accuracy statistics, per-objective statistics (ITC, ITM) and work done
    since the last log line (this rank)."""

    def __init__(self, device: torch.device):
        self.stats = torch.zeros(len(TARGET_STREAMS), 3, dtype=torch.float64, device=device)
        self.objective_stats = torch.zeros(OBJECTIVE_STATS, dtype=torch.float64, device=device)
        self.scale = torch.zeros((), dtype=torch.float64, device=device)  # the last ITC scale
        self.counts = torch.zeros(3, dtype=torch.float64)  # samples, tokens, flops

    def add(self, out: MDMOutput, b: PackedBatch, flops_fn, views=None,
            weights: tuple[float, float, float] = (1.0, 0.0, 0.0), itm_flops_fn=None) -> None:
        """`b` the CPU batch; `views` its dual-encoder views (on the CPU) when ITC ran on them:
        their forwards count as work too, and ITM's fusion pass as three times the pairs put
        back together (each pair and its two negatives: the same tokens up to the negative
        texts' lengths)."""
        self.stats += out.stats.double()
        if out.objective_stats is not None:
            self.objective_stats += out.objective_stats.double()
            self.scale = out.scale.double()
        flops = 0.0
        if flops_fn:
            flops = flops_fn(b) if weights[0] > 0 else 0.0
            if views is not None:
                flops += flops_fn(views.images) + flops_fn(views.texts)
                if weights[2] > 0 and itm_flops_fn is not None:
                    cu = views.texts.cu_seqlens
                    flops += itm_flops_fn((cu[1:] - cu[:-1]).tolist())
        self.counts += torch.tensor([b.num_samples, b.num_tokens, flops], dtype=torch.float64)

    def reduce(self, group) -> dict[str, Any]:
        k = self.stats.numel()
        t = torch.cat([self.stats.flatten(), self.objective_stats,
                       self.counts.to(self.stats.device)])
        dist.all_reduce(t, group=group)
        s = t[:k].view_as(self.stats).cpu()
        obj = t[k:k + OBJECTIVE_STATS].cpu()
        samples, tokens, flops = (float(x) for x in t[-3:])
        return {"stats": s, "objective_stats": obj, "scale": float(self.scale), "samples": samples,
                "tokens": tokens, "flops": flops}


def loss_record(loss: torch.Tensor) -> torch.Tensor:
    """[loss or 0 if it is not finite, 1, 1 if it is not finite], computed on the device."""
    loss = loss.detach().double().reshape(())
    bad = ~torch.isfinite(loss)
    return torch.stack([torch.where(bad, torch.zeros_like(loss), loss),
                        torch.ones_like(loss), bad.double()])


def itm_flops_function(model: MaskedDataModel):
    """Training FLOPs of ITM's fusion batch from the pairs' text lengths: each pair and its two
    negatives, three unmasked pair forwards (the negatives' texts have other lengths: close)."""
    try:
        from megatron_style.model.flops import sample_flops
    except ImportError:
        return None
    return lambda lens: 3.0 * sum(sample_flops(model, "pair", int(n), masked_patches=0,
                                               masked_text=0) for n in lens)


def flops_function(model: MaskedDataModel):
    """Training FLOPs of a batch, counted from the built model (None if unavailable)."""
    try:
        from megatron_style.model.flops import batch_flops
    except ImportError:
        return None
    return lambda b: batch_flops(model, b)
