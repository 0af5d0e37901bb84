"""The four communication mappings every tensor-parallel layer is built from (as in Megatron).

Each is an autograd function whose backward is the conjugate collective:
  copy_to_tp     forward identity,        backward all-reduce
  reduce_from_tp forward all-reduce,      backward identity
  scatter_to_tp  forward keep own slice,  backward all-gather       (last dim)
  gather_from_tp forward all-gather,      backward keep own slice   (last dim)
Every function takes the tensor-parallel group explicitly; with `tp` None or of size 1 they
are the identity, so the single-process model runs through the same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """A tensor-parallel process group and this process's place in it."""

    group: Optional[dist.ProcessGroup]
    rank: int
    size: int

    @staticmethod
    def single() -> "TPGroup":
        return TPGroup(None, 0, 1)


def tp_size(tp: Optional[TPGroup]) -> int:
    return 1 if tp is None else tp.size


def tp_rank(tp: Optional[TPGroup]) -> int:
    return 0 if tp is None else tp.rank


def _all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=tp.group)
    return x


def _split_last(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    n = x.shape[-1]
    if n % tp.size:
        raise ValueError(f"last dimension {n} is not divisible by the tensor-parallel size {tp.size}")
    return x.chunk(tp.size, dim=-1)[tp.rank].contiguous()


def _gather_last(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)


def _conjugate(name: str, forward: Callable, backward: Callable) -> type:
    """An autograd Function that applies `forward(x, tp)` and, to the gradient,
    `backward(g, tp)`: a TP region's mappings come in conjugate pairs (copy <-> reduce,
    scatter <-> gather), each the other's backward."""
    def fwd(ctx, x, tp):
        ctx.tp = tp
        return forward(x, tp)

    def bwd(ctx, g):
        return backward(g, ctx.tp), None

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


def _identity(x: torch.Tensor, tp: Optional[TPGroup]) -> torch.Tensor:
    return x


def _reduce(x: torch.Tensor, tp: Optional[TPGroup]) -> torch.Tensor:
    return _all_reduce(x.clone(), tp)  # in place on a copy: x may be saved for a backward


_CopyToTP = _conjugate("_CopyToTP", _identity, _reduce)
_ReduceFromTP = _conjugate("_ReduceFromTP", _reduce, _identity)
_ScatterToTP = _conjugate("_ScatterToTP", _split_last, _gather_last)
_GatherFromTP = _conjugate("_GatherFromTP", _gather_last, _split_last)


def copy_to_tp(x: torch.Tensor, tp: Optional[TPGroup]) -> torch.Tensor:
    return x if tp_size(tp) == 1 else _CopyToTP.apply(x, tp)


def reduce_from_tp(x: torch.Tensor, tp: Optional[TPGroup]) -> torch.Tensor:
    return x if tp_size(tp) == 1 else _ReduceFromTP.apply(x, tp)


def scatter_to_tp(x: torch.Tensor, tp: Optional[TPGroup]) -> torch.Tensor:
    return x if tp_size(tp) == 1 else _ScatterToTP.apply(x, tp)


def gather_from_tp(x: torch.Tensor, tp: Optional[TPGroup]) -> torch.Tensor:
    return x if tp_size(tp) == 1 else _GatherFromTP.apply(x, tp)


def all_reduce_sum_tp(x: torch.Tensor, tp: Optional[TPGroup]) -> torch.Tensor:
    """All-reduce whose backward is an all-reduce too: for statistics that every rank uses
    (the mean and variance of a LayerNorm over a sharded dimension)."""
    if tp_size(tp) == 1:
        return x
    return _AllReduceBoth.apply(x, tp)


class _AllReduceBoth(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _all_reduce(x.clone(), tp)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.tp), None
