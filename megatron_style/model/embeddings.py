"""Input embeddings: image patches (+ CLS, + mask token), text tokens, and one learned
position table per modality."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_style.config import ModelConfig
from megatron_style.batch import POSITION_OFFSET
from megatron_style.model.init import init_rule
from megatron_style.parallel.layers import init_trunc_normal_


class VisionEmbedding(nn.Module):
    """Conv2d patchify (kernel = stride = patch), masked patches replaced by a learned mask
    token, a CLS token in front. Output: [n, P + 1, D]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        rule = init_rule(cfg)
        init_trunc_normal_(self.proj.weight, rule.std, rule.cut)
        nn.init.zeros_(self.proj.bias)
        self.cls_token = nn.Parameter(init_trunc_normal_(torch.empty(1, 1, cfg.dim), rule.std, rule.cut))
        self.mask_token = nn.Parameter(init_trunc_normal_(torch.empty(1, 1, cfg.dim), rule.std, rule.cut))

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)  # [n, P, D]
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)


class PositionTable(nn.Module):
    """Learned absolute positions. Rows 0 and 1 are never used: positions count from 2, as in
    fairseq and the released checkpoints."""

    def __init__(self, rows: int, dim: int, init_std: float, init_cut: float = 2.0):
        super().__init__()
        self.weight = nn.Parameter(init_trunc_normal_(torch.empty(rows, dim), init_std, init_cut))

    def first(self, n: int) -> torch.Tensor:
        """Positions 2 .. n + 1 (a whole image: CLS and its patches)."""
        return self.weight[POSITION_OFFSET:POSITION_OFFSET + n]

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        # The width is spelled out: view(..., -1) fails on a batch without text (0 rows).
        rows = self.weight.index_select(0, positions.reshape(-1))
        return rows.view(*positions.shape, self.weight.shape[1])


def resize_vision_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """A vision position table for another patch grid, as unilm's BEiT-3 code resizes it
    (`load_model_and_may_interpolate`): the leading rows (fairseq's two unused positions and
    CLS) kept, the g0 x g0 patch rows resized bicubically to grid x grid (size=, corners not
    aligned). [3 + g0^2, D] -> [3 + grid^2, D]."""
    lead = POSITION_OFFSET + 1
    rows, D = table.shape
    g0 = math.isqrt(rows - lead)
    if g0 * g0 != rows - lead:
        raise ValueError(f"a vision position table of {rows} rows is not {lead} + a square grid")
    patches = table[lead:].reshape(1, g0, g0, D).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, D).to(table.dtype)
    return torch.cat([table[:lead], patches], dim=0)
