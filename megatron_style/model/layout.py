"""What the blocks need to know about the token stream of one forward pass."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_style.batch import Route


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
    _gathers: dict = field(default_factory=dict, repr=False)

    @property
    def packed(self) -> bool:
        return self.padded_shape is None

    def padded_gathers(self, by_way: bool) -> tuple[Optional[torch.Tensor], ...]:
        """How to attend the packed stream as an [S, L] batch (L = max_seqlen), for rows in
        way order (`by_way`, see Route) or in stream order: (the row of each of the S*L slots,
        the [S, L] key padding mask, the slot of each row); None where nothing is to be done.
        Padding slots repeat their sample's last token: masked as keys, their outputs unused.
        Computed once per forward and shared by all layers."""
        if by_way not in self._gathers:
            self._gathers[by_way] = self._make_padded_gathers(by_way)
        return self._gathers[by_way]

    def _make_padded_gathers(self, by_way: bool) -> tuple[Optional[torch.Tensor], ...]:
        S, L, T = self.num_samples, self.max_seqlen, self.token_sample.shape[0]
        pos_of_slot = slot_of_pos = mask = None
        if S * L != T:  # else every sample has L tokens: the stream is an [S, L] batch already
            starts = self.cu_seqlens[:-1].long()
            lens = self.cu_seqlens[1:].long() - starts
            j = torch.arange(L, device=starts.device).unsqueeze(0)
            mask = j >= lens.unsqueeze(1)
            pos_of_slot = (starts.unsqueeze(1) + torch.minimum(j, lens.unsqueeze(1) - 1)).reshape(-1)
            sample = self.token_sample.long()
            slot_of_pos = sample * L + torch.arange(T, device=starts.device) - starts[sample]
        if not by_way:
            return pos_of_slot, mask, slot_of_pos
        # Row r of the way order holds stream position perm[r]; position p sits in row inv[p].
        perm, inv = self.route.perm, self.route.inv
        return (inv if pos_of_slot is None else inv.index_select(0, pos_of_slot), mask,
                perm if slot_of_pos is None else slot_of_pos.index_select(0, perm))


def drop_path(x: torch.Tensor, p: float, training: bool, layout: TokenLayout) -> torch.Tensor:
    """Stochastic depth per sample: all tokens of a sample are dropped together."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(layout.num_samples).bernoulli_(1.0 - p).div_(1.0 - p)
    return x * keep.index_select(0, layout.token_sample).unsqueeze(-1)
