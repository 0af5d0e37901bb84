"""What the blocks need to know about the token stream of one forward pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_style.model.batch import Route


@dataclass
class TokenLayout:
    """Tokens are always a flat [T, D] tensor inside the blocks. Attention needs either the
    packed boundaries (cu_seqlens) or, for the padded reference layout, the [B, L] shape and
    its key padding mask."""

    route: Route                      # expert = modality (vision / language)
    route_vl: Optional[Route]         # expert in VL layers (vision / language / vision-language)
    token_sample: torch.Tensor        # [T] sample of each token, for per-sample drop path
    num_samples: int
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0
    padded_shape: Optional[tuple[int, int]] = None       # (B, L) for the padded layout
    key_padding_mask: Optional[torch.Tensor] = None      # [B, L] True = padding

    @property
    def packed(self) -> bool:
        return self.padded_shape is None


def drop_path(x: torch.Tensor, p: float, training: bool, layout: TokenLayout) -> torch.Tensor:
    """Stochastic depth per sample: all tokens of a sample are dropped together."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(layout.num_samples).bernoulli_(1.0 - p).div_(1.0 - p)
    return x * keep.index_select(0, layout.token_sample).unsqueeze(-1)
