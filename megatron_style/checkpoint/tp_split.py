"""Change the tensor-parallel degree of a model state dict: merge TP shards into the
single-process layout, and split it for another degree, so a run can continue on a different
number of GPUs.

How each parameter is split is read from the model itself: a copy of the model is built on
the meta device at the target degree (no memory, no communication) and its parameters' tags
(`tensor_model_parallel`, `partition_dim`) say which are split and along which dimension; the
row range of each rank comes from `shard_range`, which also covers uneven vocabulary splits
(64010 ids over 4 ranks: 16003, 16003, 16003, 16001).

    sd = merge_tp([sd_rank0, sd_rank1], cfg)          # -> TP=1 layout
    shards = split_tp(sd, cfg, 4)                     # -> 4 per-rank state dicts

Reading and writing files of either layout is `megatron_style/checkpoint/convert_tp.py` (the command line: cli/convert_tp.py)
(`beit3-convert-tp`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from megatron_style.config import ModelConfig
from megatron_style.config.checks import check_tensor_parallel
from megatron_style.model.pretraining import MaskedDataModel
from megatron_style.parallel.layers import shard_range
from megatron_style.parallel.mappings import TPGroup

StateDict = dict[str, Any]


@dataclass(frozen=True)
class ParamSplit:
    """How one parameter is laid out across `tensor_size` ranks."""

    full_shape: tuple[int, ...]
    dim: Optional[int]          # None: replicated on every rank

    def rows(self, rank: int, tensor_size: int) -> tuple[int, int]:
        assert self.dim is not None
        return shard_range(self.full_shape[self.dim], TPGroup(None, rank, tensor_size))

    def local_shape(self, rank: int, tensor_size: int) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        a, b = self.rows(rank, tensor_size)
        shape = list(self.full_shape)
        shape[self.dim] = b - a
        return tuple(shape)


def _meta_model(cfg: ModelConfig, tp: Optional[TPGroup]):
    # With every optional head (ITC, ITM), so that the plan covers any run's keys: those heads
    # are plain replicated modules (model/contrastive.py, model/matching.py), the same on
    # every tensor rank, and a key a checkpoint lacks is simply never looked up.
    with torch.device("meta"):
        return MaskedDataModel(cfg, tp, heads=("itc", "itm"))


def split_plan(cfg: ModelConfig, tensor_size: int) -> dict[str, ParamSplit]:
    """Parameter name -> layout at `tensor_size`, for the MaskedDataModel keys and, without
    the `beit3.` prefix, for encoder-only state dicts."""
    check_tensor_parallel(cfg, tensor_size)
    full = {n: tuple(p.shape) for n, p in _meta_model(cfg, None).named_parameters()}
    if tensor_size == 1:
        dims = {n: None for n in full}
    else:
        sharded = _meta_model(cfg, TPGroup(None, 0, tensor_size))
        dims = {n: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
                for n, p in sharded.named_parameters()}
    plan = {n: ParamSplit(full[n], dims[n]) for n in full}
    plan.update({n[len("beit3."):]: s for n, s in list(plan.items()) if n.startswith("beit3.")})
    return plan


def _split_of(plan: dict[str, ParamSplit], key: str) -> ParamSplit:
    if key in plan:
        return plan[key]
    raise KeyError(f"state dict key {key!r} is not a parameter of this model configuration "
                   f"(expected keys such as {next(iter(plan))!r}); check the model config")


def merge_tp(shards: Sequence[StateDict], cfg: ModelConfig,
             check_replicated: bool = True) -> StateDict:
    """Per-rank state dicts (in tensor-rank order) -> the single-process state dict.
    Replicated tensors must agree across ranks (they receive identical updates); a mismatch
    means the shards do not belong together, unless `check_replicated` is False."""
    T = len(shards)
    if T == 0:
        raise ValueError("merge_tp needs at least one shard")
    plan = split_plan(cfg, T)
    keys = list(shards[0].keys())
    for r, sd in enumerate(shards[1:], 1):
        if set(sd) != set(keys):
            diff = sorted(set(keys) ^ set(sd))
            raise ValueError(f"tensor rank {r}'s state dict has different keys from rank 0's, "
                             f"e.g. {diff[0]!r}")
    out: StateDict = {}
    for k in keys:
        vals = [sd[k] for sd in shards]
        if not isinstance(vals[0], torch.Tensor):
            out[k] = vals[0]
            continue
        split = _split_of(plan, k)
        for r, v in enumerate(vals):
            want = split.local_shape(r, T)
            if tuple(v.shape) != want:
                raise ValueError(f"{k}: tensor rank {r} holds shape {tuple(v.shape)}, expected "
                                 f"{want} for TP={T} (wrong model config or rank order?)")
        if split.dim is None:
            if check_replicated:
                for r, v in enumerate(vals[1:], 1):
                    if not torch.equal(v, vals[0]):
                        d = (v.float() - vals[0].float()).abs().max().item()
                        raise ValueError(f"{k}: replicated tensor differs between tensor rank 0 "
                                         f"and rank {r} (max abs difference {d:.3g}); the shards "
                                         "do not come from one step of one run")
            out[k] = vals[0].clone()
        else:
            out[k] = torch.cat(vals, dim=split.dim)
    return out


def split_tp(sd: StateDict, cfg: ModelConfig, tensor_size: int) -> list[StateDict]:
    """The single-process state dict -> `tensor_size` per-rank state dicts. Slices are
    copied, so saving one shard does not save the whole tensor's storage."""
    plan = split_plan(cfg, tensor_size)
    shards: list[StateDict] = [{} for _ in range(tensor_size)]
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            for s in shards:
                s[k] = v
            continue
        split = _split_of(plan, k)
        if tuple(v.shape) != split.full_shape:
            raise ValueError(f"{k}: shape {tuple(v.shape)}, expected {split.full_shape} for the "
                             "single-process layout (wrong model config?)")
        for r in range(tensor_size):
            if split.dim is None:
                shards[r][k] = v.clone()
            else:
                a, b = split.rows(r, tensor_size)
                shards[r][k] = v.narrow(split.dim, a, b - a).clone()
    return shards


def convert_tp(shards: Sequence[StateDict], cfg: ModelConfig, tensor_size: int) -> list[StateDict]:
    """Shards at one TP degree -> shards at another (a list of one for the single layout)."""
    return split_tp(merge_tp(shards, cfg), cfg, tensor_size)
