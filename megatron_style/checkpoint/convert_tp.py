"""`beit3-convert-tp`: change the tensor-parallel degree of model files or of a trainer
checkpoint (the merging and splitting itself is megatron_style/checkpoint/tp_split.py).

Inputs are per-rank state dict files (a plain state dict, or one under "module" / "model"),
read weights-only (they may come from anywhere), or one trainer checkpoint directory at any
ZeRO stage, which brings its own model config. Outputs are written durably: a crash leaves
the old output or none, never a part.

    beit3-convert-tp --preset giant --tensor 1 rank0.pt rank1.pt --out model.pt
    beit3-convert-tp --config configs/pretrain/giant.yaml --tensor 4 model.pt --out tp4/
    beit3-convert-tp runs/giant/checkpoints/step_00100000 --tensor 1 --out model.pt
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

import torch

from megatron_style.files import UnsafeFileError, load_untrusted, save_torch
from megatron_style.config import ConfigError, ModelConfig, load_config, model_config, parse_override
from megatron_style.checkpoint.tp_split import merge_tp, split_tp

StateDict = dict[str, Any]


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
        from megatron_style.checkpoint.fp32 import tensor_rank_state_dicts
        return tensor_rank_state_dicts(inputs[0])
    for f in inputs:
        if not os.path.isfile(f):
            raise ValueError(f"input {f!r} does not exist")
    return [_unwrap(load_untrusted(f, "model file"), f) for f in inputs]


def write_shards(shards: list[StateDict], out: str) -> list[str]:
    if len(shards) == 1:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_torch(shards[0], out)
        return [out]
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"tp_rank_{r:02d}.pt") for r in range(len(shards))]
    for sd, p in zip(shards, paths):
        save_torch(sd, p)
    return paths


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    if not args.config and not args.preset:
        # A trainer checkpoint records its config.
        from megatron_style.checkpoint.fp32 import checkpoint_config
        cfg = (checkpoint_config(args.inputs[0])
               if len(args.inputs) == 1 and os.path.isdir(args.inputs[0]) else None)
        if cfg is None:
            raise ValueError("give --preset or --config: the inputs do not record a model config")
        return cfg
    if args.config:
        return load_config(args.config, [f"model.{s}" for s in args.set]).model
    overrides = {}
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
    except (ValueError, KeyError, ConfigError, UnsafeFileError) as e:
        print(f"beit3-convert-tp: error: {e}", file=sys.stderr)
        return 2
    print(f"TP={len(shards)} -> TP={args.tensor}: wrote {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
