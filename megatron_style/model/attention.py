"""Self-attention over the whole multimodal sequence, with Sub-LN.

    x -> LN -> q, k, v -> attention (inside each sample) -> LN -> out_proj

`shared` layout (the paper): one set of projections and norms for every token.
`decoupled` layout (the released checkpoints): a set per modality; the attention itself is
still computed jointly over image and text tokens of a sample.

Under tensor parallelism q/k/v are column-parallel (each rank holds heads/T heads), the inner
LayerNorm spans all heads (its statistics are all-reduced) and out_proj is row-parallel.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kernels import dispatch
from megatron_style.config import ModelConfig
from megatron_style.model.layout import TokenLayout
from megatron_style.model.ways import grouped_add_bias, grouped_linear, grouped_norm
from megatron_style.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardedLayerNorm,
    even_shard,
    sublayer_init_scale,
)
from megatron_style.parallel.mappings import TPGroup, copy_to_tp, reduce_from_tp
from typing import Optional


class MultiwayAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: Optional[TPGroup] = None):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        ways = 2 if cfg.attention == "decoupled" else 1
        D, std = cfg.dim, cfg.init_std
        scale = sublayer_init_scale(cfg.layers)
        self.local_heads = even_shard(cfg.heads, tp, "model.heads")
        self.head_dim = cfg.head_dim
        self.norm = nn.ModuleList(nn.LayerNorm(D, eps=cfg.ln_eps) for _ in range(ways))
        self.q_proj = nn.ModuleList(ColumnParallelLinear(D, D, tp=tp, init_std=std) for _ in range(ways))
        self.k_proj = nn.ModuleList(ColumnParallelLinear(D, D, tp=tp, init_std=std) for _ in range(ways))
        self.v_proj = nn.ModuleList(ColumnParallelLinear(D, D, tp=tp, init_std=std, init_scale=scale)
                                    for _ in range(ways))
        self.inner_norm = nn.ModuleList(ShardedLayerNorm(D, cfg.ln_eps, tp) for _ in range(ways))
        self.out_proj = nn.ModuleList(RowParallelLinear(D, D, tp=tp, init_std=std, init_scale=scale)
                                      for _ in range(ways))

    @property
    def ways(self) -> int:
        return len(self.q_proj)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        route = layout.route
        if self.ways == 1:
            counts = (x.shape[0],)
            sort = unsort = (lambda t: t)
        else:
            counts, sort, unsort = route.counts, route.sort, route.unsort

        # Project in expert order (one gather in), attend in stream order (one gather out).
        hs = copy_to_tp(grouped_norm(sort(x), counts, self.norm), self.tp)
        # q, k and v in one matmul per way (their weights stacked): one pass over hs.
        qkv = grouped_linear(hs, counts, [(q, k, v) for q, k, v in
                                          zip(self.q_proj, self.k_proj, self.v_proj)])
        q, k, v = unsort(qkv).view(x.shape[0], 3, self.local_heads, self.head_dim).unbind(1)
        o = self._attend(q, k, v, layout).reshape(x.shape[0], self.local_heads * self.head_dim)

        os_ = grouped_norm(sort(o), counts, self.inner_norm)
        out = reduce_from_tp(grouped_linear(os_, counts, self.out_proj, with_bias=False), self.tp)
        out = grouped_add_bias(out, counts, [m.bias for m in self.out_proj])
        return unsort(out)

    def _attend(self, q, k, v, layout: TokenLayout) -> torch.Tensor:
        scale = self.head_dim ** -0.5
        if layout.packed:
            # Samples of one length (a batch of images) are a [S, L] batch already: on the CPU
            # this skips the reference varlen path's padding and unpadding (host ints only).
            S, L = layout.num_samples, layout.max_seqlen
            if q.is_cuda or S * L != q.shape[0]:
                return dispatch.varlen_attention(q, k, v, layout.cu_seqlens, L, scale)
            B, mask = S, None
        else:
            (B, L), mask = layout.padded_shape, layout.key_padding_mask
        qb, kb, vb = (t.view(B, L, self.local_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        o = dispatch.padded_attention(qb, kb, vb, mask, scale)
        return o.transpose(1, 2).reshape(B * L, self.local_heads, self.head_dim)
