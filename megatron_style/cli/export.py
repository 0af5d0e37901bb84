"""`beit3-export`: the command line over megatron_style.train.export, which documents it."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from megatron_style.config import ConfigError
from megatron_style.files import UnsafeFileError
from megatron_style.train.export import export
import megatron_style.train.export as lib


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="beit3-export", description=lib.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint.dir of a run, or one step_XXXXXXXX directory in it")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--layout", choices=["ours", "released", "retrieval"], default="ours")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.layout)
    except (ValueError, ConfigError, UnsafeFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # mmap: counting does not read the (possibly huge) file into memory
    n = sum(v.numel() for v in torch.load(out, map_location="cpu", weights_only=True,
                                          mmap=True)["model"].values())
    print(f"wrote {out}: {n / 1e6:.1f}M parameters, {args.layout} layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
