"""PyTorch reference for the masked-token loss: logits for the masked positions only, then
cross-entropy. This is the "naive" path the chunked kernel is compared with: it holds the full
[masked tokens, vocabulary] logits matrix."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def masked_token_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [M, D], weight [V, D], bias [V], targets [M] -> (loss [M] fp32, argmax [M])."""
    logits = F.linear(hidden, weight, bias).float()
    loss = F.cross_entropy(logits, targets, reduction="none")
    return loss, logits.detach().argmax(dim=-1)
