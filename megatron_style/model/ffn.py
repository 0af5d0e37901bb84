"""The modality-routed feed-forward network: one expert per modality, chosen per token.

    expert e:  LN -> fc1 -> GELU -> LN (Sub-LN) -> fc2

Every layer has a vision (V) and a language (L) expert; the top `vl_layers` layers also have a
vision-language (VL) expert that takes every token of an image-text pair. Tokens are sorted by
expert once, each expert's rows are processed as one group (grouped GEMMs on GPU), and the
output is put back in stream order. Under tensor parallelism fc1 is column-parallel and fc2
row-parallel inside every expert; the cross-rank sum is done once for all experts.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megatron_style.config import ModelConfig
from megatron_style.batch import Route
from megatron_style.model.init import init_rule
from megatron_style.model.ways import grouped_linear, grouped_norm, row_parallel_out
from megatron_style.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardedLayerNorm,
)
from megatron_style.parallel.mappings import TPGroup, copy_to_tp

EXPERT_NAMES = ("vision", "language", "vision_language")


class Expert(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: Optional[TPGroup] = None, index: int = 0):
        """`index`: the 0-based layer this expert belongs to (the init of fc2 depends on it)."""
        super().__init__()
        rule = init_rule(cfg)
        init = dict(tp=tp, init_std=rule.std, init_cut=rule.cut)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.fc1 = ColumnParallelLinear(cfg.dim, cfg.ffn_dim, init_scale=rule.inner_scale, **init)
        self.ffn_norm = ShardedLayerNorm(cfg.ffn_dim, cfg.ln_eps, tp)
        self.fc2 = RowParallelLinear(cfg.ffn_dim, cfg.dim, init_scale=rule.output_scale(index),
                                     **init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One expert on its own (all rows belong to it)."""
        return RoutedFFN.run([self], (x.shape[0],), x, self.fc1.tp)


class RoutedFFN(nn.Module):
    def __init__(self, cfg: ModelConfig, num_experts: int, tp: Optional[TPGroup] = None,
                 index: int = 0):
        super().__init__()
        self.tp = tp
        self.experts = nn.ModuleList(Expert(cfg, tp, index) for _ in range(num_experts))

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        if len(route.counts) != len(self.experts):
            raise ValueError(f"route has {len(route.counts)} groups for {len(self.experts)} experts")
        return route.unsort(self.run(self.experts, route.counts, route.sort(x), self.tp))

    @staticmethod
    def run(experts, counts, xs: torch.Tensor, tp: Optional[TPGroup]) -> torch.Tensor:
        """The expert computation on rows already sorted by expert."""
        h = copy_to_tp(grouped_norm(xs, counts, [e.norm for e in experts]), tp)
        h = grouped_linear(h, counts, [e.fc1 for e in experts], activation="gelu")
        h = grouped_norm(h, counts, [e.ffn_norm for e in experts])
        return row_parallel_out(h, counts, [e.fc2 for e in experts], tp)
