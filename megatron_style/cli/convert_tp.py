"""`beit3-convert-tp`: the command line over megatron_style.checkpoint.convert_tp, which documents it."""
from __future__ import annotations

import argparse
import sys
from typing import Optional
import os

from megatron_style.checkpoint.convert_tp import read_shards, write_shards
from megatron_style.checkpoint.tp_split import merge_tp, split_tp
from megatron_style.config import ConfigError, ModelConfig, load_config, model_config, parse_override
from megatron_style.files import UnsafeFileError
import megatron_style.checkpoint.convert_tp as lib


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
    p = argparse.ArgumentParser(prog="beit3-convert-tp", description=lib.__doc__.split("\n\n")[0],
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
