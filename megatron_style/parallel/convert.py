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

Command line (files hold a plain state dict, or a dict with it under "module" / "model"; a
trainer checkpoint directory works too, at any ZeRO stage, and brings its own config):

    beit3-convert-tp --preset giant --tensor 1 rank0.pt rank1.pt --out model.pt
    beit3-convert-tp --config configs/pretrain/giant.yaml --tensor 4 model.pt --out tp4/
    beit3-convert-tp runs/giant/checkpoints/step_00100000 --tensor 1 --out model.pt
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from megatron_style.config import ModelConfig, load_config, model_config
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
    from megatron_style.model.pretraining import MaskedDataModel
    with torch.device("meta"):
        return MaskedDataModel(cfg, tp)


def check_tensor_size(cfg: ModelConfig, tensor_size: int) -> None:
    if tensor_size < 1:
        raise ValueError(f"tensor-parallel size {tensor_size}: must be >= 1")
    for name in ("heads", "ffn_dim"):
        if getattr(cfg, name) % tensor_size:
            raise ValueError(f"tensor-parallel size {tensor_size} does not divide model.{name} = "
                             f"{getattr(cfg, name)}")


def split_plan(cfg: ModelConfig, tensor_size: int) -> dict[str, ParamSplit]:
    """Parameter name -> layout at `tensor_size`, for the MaskedDataModel keys and, without
    the `beit3.` prefix, for encoder-only state dicts."""
    check_tensor_size(cfg, tensor_size)
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


def merge_checkpoint_tp(tag_dir: str):
    """fp32 state dict of a DeepSpeed checkpoint written with any TP degree and ZeRO stage,
    merged to the single-process layout, plus its step and config (see consolidate.py)."""
    from megatron_style.parallel.consolidate import merge_checkpoint_tp as merge
    return merge(tag_dir)


# ---- files -----------------------------------------------------------------------------------

def _unwrap(obj: Any, path: str) -> StateDict:
    if isinstance(obj, dict):
        for key in ("module", "model"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"{path}: expected a state dict, or a dict holding one under 'module' or "
                     "'model'")


def read_shards(inputs: Sequence[str]) -> list[StateDict]:
    """Files in tensor-rank order, or one DeepSpeed checkpoint directory (a step_XXXXXXXX
    directory of the trainer; any ZeRO stage: the fp32 master weights are read)."""
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        from megatron_style.parallel.consolidate import tensor_rank_state_dicts
        return tensor_rank_state_dicts(inputs[0])
    for f in inputs:
        if not os.path.isfile(f):
            raise ValueError(f"input {f!r} does not exist")
    return [_unwrap(torch.load(f, map_location="cpu", weights_only=True), f) for f in inputs]


def write_shards(shards: list[StateDict], out: str) -> list[str]:
    if len(shards) == 1:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        torch.save(shards[0], out)
        return [out]
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"tp_rank_{r:02d}.pt") for r in range(len(shards))]
    for sd, p in zip(shards, paths):
        torch.save(sd, p)
    return paths


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    if not args.config and not args.preset:
        # A trainer checkpoint records its config.
        from megatron_style.parallel.consolidate import checkpoint_config
        cfg = (checkpoint_config(args.inputs[0])
               if len(args.inputs) == 1 and os.path.isdir(args.inputs[0]) else None)
        if cfg is None:
            raise ValueError("give --preset or --config: the inputs do not record a model config")
        return cfg
    if args.config:
        return load_config(args.config, [f"model.{s}" for s in args.set]).model
    overrides = {}
    from megatron_style.config import parse_override
    for s in args.set:
        path, value = parse_override(s)
        overrides[".".join(path)] = value
    return model_config(args.preset, **overrides)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="beit3-convert-tp", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="model preset: tiny, base, large, giant (not needed for a "
                     "trainer checkpoint directory, which records its config)")
    src.add_argument("--config", help="pretraining recipe (YAML/JSON); its `model` section is used")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model field override, e.g. --set text_vocab_size=64010 (repeatable)")
    p.add_argument("--tensor", type=int, required=True, help="tensor-parallel degree to write")
    p.add_argument("inputs", nargs="+", help="per-rank state dict files in tensor-rank order, "
                   "or one checkpoint directory of the trainer (step_XXXXXXXX, any ZeRO stage)")
    p.add_argument("--out", required=True,
                   help="output file for --tensor 1, else a directory for tp_rank_XX.pt files")
    p.add_argument("--no-check-replicated", action="store_true",
                   help="do not require replicated tensors to be equal across input ranks")
    args = p.parse_args(argv)
    try:
        cfg = model_config_from_args(args)
        shards = read_shards(args.inputs)
        merged = merge_tp(shards, cfg, check_replicated=not args.no_check_replicated)
        paths = write_shards(split_tp(merged, cfg, args.tensor), args.out)
    except (ValueError, KeyError) as e:
        print(f"beit3-convert-tp: error: {e}", file=sys.stderr)
        return 2
    print(f"TP={len(shards)} -> TP={args.tensor}: wrote {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
