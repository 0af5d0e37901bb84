"""PyTorch reference for attention over packed variable-length sequences.

The packed stream holds many samples back to back (cu_seqlens marks where each starts);
attention must stay inside each sample. The reference pads the samples into a
[samples, max_seqlen] batch, runs `scaled_dot_product_attention` with a key mask and
unpads again: O(samples x max_seqlen^2) memory, never the full stream squared.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: Optional[float] = None) -> torch.Tensor:
    """q, k, v: [T, H, D] packed; cu_seqlens: [S+1] int, cu_seqlens[-1] == T. Returns [T, H, D]."""
    T, H, D = q.shape
    starts = cu_seqlens[:-1].long()
    lens = cu_seqlens[1:].long() - starts
    cols = torch.arange(max_seqlen, device=q.device)
    valid = cols.unsqueeze(0) < lens.unsqueeze(1)  # [S, L]

    def pad(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(lens.shape[0], max_seqlen, H, D)
        out[valid] = x
        return out.transpose(1, 2)  # [S, H, L, D]

    mask = valid[:, None, None, :]  # keys that exist
    o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, scale=scale)
    return o.transpose(1, 2)[valid]


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding_mask: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    """q, k, v: [B, H, L, D]; key_padding_mask: [B, L] True where the key is padding."""
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
