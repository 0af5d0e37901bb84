"""One Multiway Transformer layer: shared self-attention, then the modality-routed FFN,
each a pre-LN residual branch with per-sample drop path."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megatron_style.config import ModelConfig
from megatron_style.model.attention import MultiwayAttention
from megatron_style.model.ffn import RoutedFFN
from megatron_style.model.layout import TokenLayout, drop_path
from megatron_style.parallel.mappings import TPGroup


def drop_path_rate(cfg: ModelConfig, index: int) -> float:
    """Rises linearly from 0 at the first layer to cfg.drop_path at the last."""
    return 0.0 if cfg.layers == 1 else cfg.drop_path * index / (cfg.layers - 1)


class MultiwayBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, tp: Optional[TPGroup] = None):
        super().__init__()
        self.index = index
        self.has_vl = cfg.has_vl_expert(index)
        self.drop_path = drop_path_rate(cfg, index)
        self.attn = MultiwayAttention(cfg, tp, index)
        self.ffn = RoutedFFN(cfg, 3 if self.has_vl else 2, tp, index)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        x = x + drop_path(self.attn(x, layout), self.drop_path, self.training, layout)
        route = layout.route_vl if self.has_vl else layout.route
        return x + drop_path(self.ffn(x, route), self.drop_path, self.training, layout)
