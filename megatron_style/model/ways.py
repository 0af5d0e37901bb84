"""Per-modality ("multiway") parameter sets applied to a token stream.

A `ways` list holds one module per group of a Route (one entry = shared by all tokens). The
tokens are sorted by group once, each group's rows go through its own parameters with the
grouped ops in `kernels.dispatch`, and the result is put back in stream order.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from kernels import dispatch
from megatron_style.model.batch import Route
from megatron_style.parallel.layers import ShardedLayerNorm, sharded_layer_norm
from megatron_style.parallel.mappings import tp_size


def grouped_norm(xs: torch.Tensor, counts: Sequence[int], norms: Sequence[nn.Module]) -> torch.Tensor:
    """LayerNorm per group on rows sorted by group. `norms` are nn.LayerNorm or
    ShardedLayerNorm (the latter all-reduce their statistics under tensor parallelism)."""
    n0 = norms[0]
    if isinstance(n0, ShardedLayerNorm) and tp_size(n0.tp) > 1:
        parts = torch.split(xs, list(counts), dim=0)
        return torch.cat([sharded_layer_norm(p, n.weight, n.bias, n.eps, n.full_dim, n.tp)
                          for p, n in zip(parts, norms)], dim=0)
    eps = n0.eps
    if len(norms) == 1:
        return dispatch.layer_norm(xs, n0.weight, n0.bias, eps)
    return dispatch.grouped_layer_norm(xs, counts, [n.weight for n in norms],
                                       [n.bias for n in norms], eps)


def ways_norm(x: torch.Tensor, route: Route, norms: nn.ModuleList) -> torch.Tensor:
    """Apply the per-modality LayerNorm to tokens in stream order."""
    if len(norms) == 1:
        return grouped_norm(x, (x.shape[0],), norms)
    return route.unsort(grouped_norm(route.sort(x), route.counts, norms))


def grouped_linear(xs: torch.Tensor, counts: Sequence[int], linears: Sequence[nn.Module],
                   activation: Optional[str] = None, with_bias: bool = True) -> torch.Tensor:
    """Each group's rows through its own linear (+ activation). `with_bias=False` leaves the
    bias for later (row-parallel layers add it after the cross-rank sum)."""
    return dispatch.grouped_linear(xs, counts, [m.weight for m in linears],
                                   [m.bias if with_bias else None for m in linears], activation)
