"""Per-modality ("multiway") parameter sets applied to a token stream.

A `ways` list holds one module per group of a Route (one entry = shared by all tokens). The
tokens are sorted by group once, each group's rows go through its own parameters with the
grouped ops in `kernels.dispatch`, and the result is put back in stream order.

Groups without rows (an image-only batch has no language tokens) are left out of the
computation: running them on zero rows would cost a copy of the whole output (concatenating an
empty part still copies the other). Their parameters are tied in with `zero_tie`, so that they
still get a (zero) gradient: ZeRO and DDP expect a gradient for every parameter on every step.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from kernels import dispatch
from megatron_style.batch import Route
from megatron_style.parallel.layers import ShardedLayerNorm, sharded_layer_norm
from megatron_style.parallel.mappings import reduce_from_tp, tp_size


class _ZeroTie(torch.autograd.Function):
    """Forward: a scalar 0, computed from nothing. Backward: a zero gradient for each input,
    as a broadcast view (no memory): reading a 64010 x 768 embedding just to multiply it by 0
    would cost more than the whole tie is worth."""

    @staticmethod
    def forward(ctx, *params: torch.Tensor) -> torch.Tensor:
        ctx.specs = [(p.shape, p.dtype, p.device) for p in params]
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return tuple(torch.zeros((), dtype=dt, device=dev).expand(shape)
                     for shape, dt, dev in ctx.specs)


def zero_tie(params: Iterable[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """A scalar 0 that depends on `params` (None when there is nothing to tie or no autograd):
    added to an output, it gives each parameter a zero gradient without touching its data."""
    if not torch.is_grad_enabled():
        return None
    ps = [p for p in params if p is not None and p.requires_grad]
    return _ZeroTie.apply(*ps) if ps else None


def _with_tie(t: Optional[torch.Tensor], tie: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """Bias `t` (or a zero bias of width n when t is None) with the tie added: a vector, so
    that the tie costs nothing per token."""
    if tie is None:
        return t
    return tie.expand(n).contiguous() if t is None else t + tie


def _nonempty(counts: Sequence[int]) -> list[int]:
    return [i for i, c in enumerate(counts) if c > 0]


def grouped_norm(xs: torch.Tensor, counts: Sequence[int], norms: Sequence[nn.Module]) -> torch.Tensor:
    """LayerNorm per group on rows sorted by group. `norms` are nn.LayerNorm or
    ShardedLayerNorm (the latter all-reduce their statistics under tensor parallelism)."""
    keep = _nonempty(counts) or [0]
    tie = zero_tie(p for i, n in enumerate(norms) if i not in keep for p in (n.weight, n.bias))
    used = [norms[i] for i in keep]
    kept_counts = [counts[i] for i in keep]
    weights = [n.weight for n in used]
    biases = [n.bias for n in used]
    biases[0] = _with_tie(biases[0], tie, biases[0].shape[0])
    n0 = used[0]
    if isinstance(n0, ShardedLayerNorm) and tp_size(n0.tp) > 1:
        parts = torch.split(xs, kept_counts, dim=0)
        outs = [sharded_layer_norm(p, w, b, n.eps, n.full_dim, n.tp)
                for p, w, b, n in zip(parts, weights, biases, used)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    if len(used) == 1:
        return dispatch.layer_norm(xs, weights[0], biases[0], n0.eps)
    return dispatch.grouped_layer_norm(xs, kept_counts, weights, biases, n0.eps)


def ways_norm(x: torch.Tensor, route: Route, norms: nn.ModuleList) -> torch.Tensor:
    """Apply the per-modality LayerNorm to tokens in stream order."""
    if len(norms) == 1:
        return grouped_norm(x, (x.shape[0],), norms)
    return route.unsort(grouped_norm(route.sort(x), route.counts, norms))


def grouped_linear(xs: torch.Tensor, counts: Sequence[int], linears: Sequence[nn.Module],
                   activation: Optional[str] = None, with_bias: bool = True) -> torch.Tensor:
    """Each group's rows through its own linear (+ activation). `with_bias=False` leaves the
    bias for later (row-parallel layers add it after the cross-rank sum)."""
    keep = _nonempty(counts) or [0]
    tie = zero_tie(p for i, m in enumerate(linears) if i not in keep
                   for p in (m.weight, m.bias if with_bias else None))
    weights = [linears[i].weight for i in keep]
    biases = [linears[i].bias if with_bias else None for i in keep]
    biases[0] = _with_tie(biases[0], tie, weights[0].shape[0])
    return dispatch.grouped_linear(xs, [counts[i] for i in keep], weights, biases, activation)


def grouped_add_bias(xs: torch.Tensor, counts: Sequence[int], biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each group's bias added to its rows (after a row-parallel cross-rank sum)."""
    keep = _nonempty(counts) or [0]
    tie = zero_tie(b for i, b in enumerate(biases) if i not in keep)
    used = [biases[i] for i in keep]
    used[0] = _with_tie(used[0], tie, used[0].shape[0])
    if len(used) == 1:
        return xs + used[0]
    return dispatch.grouped_add_bias(xs, [counts[i] for i in keep], used)


def row_parallel_out(xs: torch.Tensor, counts: Sequence[int], linears: Sequence[nn.Module],
                     tp) -> torch.Tensor:
    """The grouped row-parallel output projection (out_proj, fc2): partial products summed
    across tensor-parallel ranks, then the bias. On one rank the bias rides in the matmul."""
    if tp_size(tp) == 1:
        return grouped_linear(xs, counts, linears)
    partial = reduce_from_tp(grouped_linear(xs, counts, linears, with_bias=False), tp)
    return grouped_add_bias(partial, counts, [m.bias for m in linears])
