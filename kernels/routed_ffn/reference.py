"""PyTorch reference for the modality-routed FFN's building blocks.

Tokens arrive sorted by expert: rows [0, counts[0]) belong to expert 0, the next counts[1]
rows to expert 1, and so on. Each op applies expert e's parameters to its rows. Empty groups
still run (on zero rows) so that every expert's parameters take part in autograd and get a
(zero) gradient: ZeRO expects a gradient for every parameter on every step.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def _slices(x: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
    if sum(counts) != x.shape[0]:
        raise ValueError(f"group counts {list(counts)} sum to {sum(counts)}, but there are "
                         f"{x.shape[0]} rows")
    return list(torch.split(x, list(counts), dim=0))


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def gelu(x: torch.Tensor) -> torch.Tensor:
    # Exact (erf) GELU computed in fp32, as the reference BEiT-3 implementation does.
    return F.gelu(x.float()).to(x.dtype)


def grouped_linear(x: torch.Tensor, counts: Sequence[int], weights: Sequence[torch.Tensor],
                   biases: Sequence[Optional[torch.Tensor]],
                   activation: Optional[str] = None) -> torch.Tensor:
    """Rows of group e: act(x_e @ W_e^T + b_e). activation: None or "gelu"."""
    outs = []
    for xe, w, b in zip(_slices(x, counts), weights, biases):
        y = F.linear(xe, w, b)
        outs.append(gelu(y) if activation == "gelu" else y)
    return _cat(outs)


def grouped_layer_norm(x: torch.Tensor, counts: Sequence[int], weights: Sequence[torch.Tensor],
                       biases: Sequence[torch.Tensor], eps: float) -> torch.Tensor:
    outs = [F.layer_norm(xe, (xe.shape[-1],), w, b, eps)
            for xe, w, b in zip(_slices(x, counts), weights, biases)]
    return _cat(outs)


def grouped_add_bias(x: torch.Tensor, counts: Sequence[int],
                     biases: Sequence[torch.Tensor]) -> torch.Tensor:
    return _cat([xe + b for xe, b in zip(_slices(x, counts), biases)])
