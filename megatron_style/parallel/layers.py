"""Tensor-parallel layers. With `tp` None (or size 1) each one is its plain PyTorch equivalent
with the same parameter names and shapes, so one model definition serves every TP degree.

Initialisation happens on the full (unsharded) weight, drawn from the global RNG in the same
order on every rank, and then each rank keeps its slice: a TP=2 model starts from exactly the
weights of the TP=1 model built with the same seed.

Every sharded parameter is tagged (`tensor_model_parallel`, `partition_dim`) the way Megatron
and DeepSpeed expect, so that gradient-norm clipping counts replicated parameters once and
checkpoint converters know how to merge it. Tags are set only when the layer is really split
(TP size > 1); `convert.py` builds a meta-device model at the target TP degree to read them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_style.parallel.mappings import (
    TPGroup,
    all_reduce_sum_tp,
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    tp_rank,
    tp_size,
)


def shard_range(n: int, tp: Optional[TPGroup]) -> tuple[int, int]:
    """Rows [start, end) of an n-row dimension held by this rank. Uneven sizes are allowed
    (vocabularies such as 64010 do not divide by 4): the last ranks may hold fewer rows."""
    size, rank = tp_size(tp), tp_rank(tp)
    per = -(-n // size)
    start = min(rank * per, n)
    return start, min(start + per, n)


def even_shard(n: int, tp: Optional[TPGroup], what: str) -> int:
    size = tp_size(tp)
    if n % size:
        raise ValueError(f"{what} = {n} is not divisible by the tensor-parallel size {size}")
    return n // size


def init_trunc_normal_(t: torch.Tensor, std: float, cut: float = 2.0) -> torch.Tensor:
    """Normal(0, std) truncated to [-cut * std, cut * std]. BEiT draws with cut 1 (its
    trunc_normal_ passes a = -std, b = std: values in [-0.02, 0.02]); torchscale's Sub-LN rule
    uses cut 2. (timm's own default, a = -2, b = 2 in absolute units, is no cut at std 0.02.)
    The model picks the cut (model/init.py)."""
    return nn.init.trunc_normal_(t, mean=0.0, std=std, a=-cut * std, b=cut * std)


def _mark(p: nn.Parameter, dim: Optional[int], tp: Optional[TPGroup]) -> nn.Parameter:
    """Tag `p` as split along `dim` when it really is split (tensor-parallel size > 1).
    Without a TP group a layer holds the whole tensor and is tagged replicated: DeepSpeed
    counts untagged-as-split parameters once per TP group in the gradient norm, so a layer
    deliberately kept whole inside a TP model (the pixel-regression head) must not be tagged."""
    split = dim is not None and tp_size(tp) > 1
    p.tensor_model_parallel = split
    p.partition_dim = dim if split else -1
    p.partition_stride = 1
    return p


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows: each rank computes its slice of y."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 tp: Optional[TPGroup] = None, init_std: float = 0.02, init_scale: float = 1.0,
                 gather_output: bool = False, init_cut: float = 2.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp, self.gather_output = tp, gather_output
        self.start, self.end = shard_range(out_features, tp)
        if gather_output and out_features % tp_size(tp):
            # all_gather needs equal slices; vocabulary heads (uneven) never gather anyway.
            raise ValueError(f"gather_output needs out_features ({out_features}) divisible by "
                             f"the tensor-parallel size {tp_size(tp)}")
        full = init_trunc_normal_(torch.empty(out_features, in_features), init_std,
                                  init_cut) * init_scale
        self.weight = _mark(nn.Parameter(full[self.start:self.end].clone()), 0, tp)
        self.bias = _mark(nn.Parameter(torch.zeros(self.end - self.start)), 0, tp) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp(x, self.tp), self.weight, self.bias)
        return gather_from_tp(y, self.tp) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features} (rows {self.start}:{self.end})"


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns: x arrives split on its last dimension,
    partial products are summed across ranks, then the (replicated) bias is added."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 tp: Optional[TPGroup] = None, init_std: float = 0.02, init_scale: float = 1.0,
                 init_cut: float = 2.0):
        super().__init__()
        self.in_features, self.out_features, self.tp = in_features, out_features, tp
        local = even_shard(in_features, tp, "input features of a row-parallel linear")
        self.start, self.end = tp_rank(tp) * local, (tp_rank(tp) + 1) * local
        full = init_trunc_normal_(torch.empty(out_features, in_features), init_std,
                                  init_cut) * init_scale
        self.weight = _mark(nn.Parameter(full[:, self.start:self.end].clone()), 1, tp)
        self.bias = _mark(nn.Parameter(torch.zeros(out_features)), None, tp) if bias else None

    def forward_partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial product, before the cross-rank sum and without the bias."""
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(self.forward_partial(x), self.tp)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features} (cols {self.start}:{self.end}), out={self.out_features}"


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; ids outside this rank's rows contribute zero
    and the partial lookups are summed across ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: Optional[TPGroup] = None,
                 init_std: float = 0.02, init_cut: float = 2.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.tp = num_embeddings, embedding_dim, tp
        self.start, self.end = shard_range(num_embeddings, tp)
        full = init_trunc_normal_(torch.empty(num_embeddings, embedding_dim), init_std, init_cut)
        self.weight = _mark(nn.Parameter(full[self.start:self.end].clone()), 0, tp)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp_size(self.tp) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        y = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(y, self.tp)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim} (rows {self.start}:{self.end})"


class ShardedLayerNorm(nn.Module):
    """LayerNorm over a feature dimension that is split across tensor-parallel ranks.

    Sub-LN puts a LayerNorm on the attention output (split by heads) and on the FFN hidden
    (split by fc1 columns); under TP the mean and variance need every rank's part, so they
    are all-reduced. With one rank this is exactly `nn.LayerNorm`.
    """

    def __init__(self, full_dim: int, eps: float = 1e-5, tp: Optional[TPGroup] = None):
        super().__init__()
        self.full_dim, self.eps, self.tp = full_dim, eps, tp
        local = even_shard(full_dim, tp, "features of a sharded LayerNorm")
        self.weight = _mark(nn.Parameter(torch.ones(local)), 0, tp)
        self.bias = _mark(nn.Parameter(torch.zeros(local)), 0, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tp_size(self.tp) == 1:
            from kernels import dispatch
            return dispatch.layer_norm(x, self.weight, self.bias, self.eps)
        return sharded_layer_norm(x, self.weight, self.bias, self.eps, self.full_dim, self.tp)


def sharded_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       full_dim: int, tp: Optional[TPGroup]) -> torch.Tensor:
    xf = x.float()
    mean = all_reduce_sum_tp(xf.sum(-1, keepdim=True), tp) / full_dim
    xc = xf - mean
    var = all_reduce_sum_tp((xc * xc).sum(-1, keepdim=True), tp) / full_dim
    y = xc * torch.rsqrt(var + eps)
    return (y * weight.float() + bias.float()).to(x.dtype)
