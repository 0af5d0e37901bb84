"""Input embeddings: image patches (+ CLS, + mask token), text tokens, and one learned
position table per modality."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megatron_style.config import ModelConfig
from megatron_style.batch import POSITION_OFFSET
from megatron_style.parallel.layers import init_trunc_normal_


class VisionEmbedding(nn.Module):
    """Conv2d patchify (kernel = stride = patch), masked patches replaced by a learned mask
    token, a CLS token in front. Output: [n, P + 1, D]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        init_trunc_normal_(self.proj.weight, cfg.init_std)
        nn.init.zeros_(self.proj.bias)
        self.cls_token = nn.Parameter(init_trunc_normal_(torch.empty(1, 1, cfg.dim), cfg.init_std))
        self.mask_token = nn.Parameter(init_trunc_normal_(torch.empty(1, 1, cfg.dim), cfg.init_std))

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)  # [n, P, D]
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)


class PositionTable(nn.Module):
    """Learned absolute positions. Rows 0 and 1 are never used: positions count from 2, as in
    fairseq and the released checkpoints."""

    def __init__(self, rows: int, dim: int, init_std: float):
        super().__init__()
        self.weight = nn.Parameter(init_trunc_normal_(torch.empty(rows, dim), init_std))

    def first(self, n: int) -> torch.Tensor:
        """Positions 2 .. n + 1 (a whole image: CLS and its patches)."""
        return self.weight[POSITION_OFFSET:POSITION_OFFSET + n]

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        # The width is spelled out: view(..., -1) fails on a batch without text (0 rows).
        rows = self.weight.index_select(0, positions.reshape(-1))
        return rows.view(*positions.shape, self.weight.shape[1])
