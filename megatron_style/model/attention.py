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
from megatron_style.model.init import init_rule
from megatron_style.model.layout import TokenLayout
from megatron_style.model.ways import grouped_linear, grouped_norm, row_parallel_out
from megatron_style.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardedLayerNorm,
    even_shard,
)
from megatron_style.parallel.mappings import TPGroup, copy_to_tp
from typing import Optional


class MultiwayAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: Optional[TPGroup] = None, index: int = 0):
        """`index`: the layer's 0-based position; the init of out_proj depends on it."""
        super().__init__()
        self.cfg, self.tp = cfg, tp
        ways = 2 if cfg.attention == "decoupled" else 1
        D, rule = cfg.dim, init_rule(cfg)
        init = dict(tp=tp, init_std=rule.std, init_cut=rule.cut)
        self.local_heads = even_shard(cfg.heads, tp, "model.heads")
        self.head_dim = cfg.head_dim
        self.norm = nn.ModuleList(nn.LayerNorm(D, eps=cfg.ln_eps) for _ in range(ways))
        self.q_proj = nn.ModuleList(ColumnParallelLinear(D, D, **init) for _ in range(ways))
        self.k_proj = nn.ModuleList(ColumnParallelLinear(D, D, **init) for _ in range(ways))
        self.v_proj = nn.ModuleList(ColumnParallelLinear(D, D, init_scale=rule.inner_scale, **init)
                                    for _ in range(ways))
        self.inner_norm = nn.ModuleList(ShardedLayerNorm(D, cfg.ln_eps, tp) for _ in range(ways))
        self.out_proj = nn.ModuleList(RowParallelLinear(D, D, init_scale=rule.output_scale(index),
                                                        **init) for _ in range(ways))

    @property
    def ways(self) -> int:
        return len(self.q_proj)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        route = layout.route
        # Rows are sorted by way only when there are two ways and both have tokens.
        by_way = self.ways > 1 and not route.trivial
        counts = route.counts if self.ways > 1 else (x.shape[0],)
        sort = route.sort if by_way else (lambda t: t)
        unsort = route.unsort if by_way else (lambda t: t)

        # Project in way order, attend per sample, normalise and project out in way order.
        # (q, k, v stay three matmuls: stacking their weights each step costs more on the CPU
        # than one wider matmul saves.)
        hs = copy_to_tp(grouped_norm(sort(x), counts, self.norm), self.tp)
        qkv = [grouped_linear(hs, counts, proj) for proj in (self.q_proj, self.k_proj, self.v_proj)]
        o = self._attend(qkv, layout, by_way)
        os_ = grouped_norm(o, counts, self.inner_norm)
        return unsort(row_parallel_out(os_, counts, self.out_proj, self.tp))

    def _attend(self, qkv: list[torch.Tensor], layout: TokenLayout, by_way: bool) -> torch.Tensor:
        """Attention inside each sample; rows of q, k, v [T, width] and of the result are in
        way order when `by_way`, else in stream order."""
        T, H, d = qkv[0].shape[0], self.local_heads, self.head_dim
        scale = d ** -0.5
        route = layout.route
        if layout.packed and _varlen_kernel_in_use(qkv[0]):
            q, k, v = ((route.unsort(t) if by_way else t).view(T, H, d) for t in qkv)
            o = dispatch.varlen_attention(q, k, v, layout.cu_seqlens, layout.max_seqlen, scale)
            o = o.reshape(T, H * d)
            return route.sort(o) if by_way else o
        # Otherwise as a [B, L] batch: one gather into its slots, one gather back out.
        if layout.packed:
            B, L = layout.num_samples, layout.max_seqlen
            gather_in, mask, gather_out = layout.padded_gathers(by_way)
        else:
            (B, L), mask = layout.padded_shape, layout.key_padding_mask
            gather_in, gather_out = (route.inv, route.perm) if by_way else (None, None)
        q, k, v = ((t if gather_in is None else t.index_select(0, gather_in))
                   .view(B, L, H, d).transpose(1, 2) for t in qkv)
        o = dispatch.padded_attention(q, k, v, mask, scale).transpose(1, 2).reshape(B * L, H * d)
        return o if gather_out is None else o.index_select(0, gather_out)


def _varlen_kernel_in_use(t: torch.Tensor) -> bool:
    """Whether dispatch runs a fused varlen attention kernel on `t`. Otherwise its reference
    would pad q, k and v one by one; attending the stream as a padded batch here costs two
    gathers per layer instead (their indices are computed once per forward, in the layout)."""
    mode = dispatch.get_mode()
    return mode == "triton" or (mode == "auto" and t.is_cuda
                                and dispatch.triton_available("varlen_attention"))
