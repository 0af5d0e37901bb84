"""`beit3-kernel-check`: the command line over kernels/selfcheck.py, which documents it: the
start-up self-check of the Triton kernels, by hand, as a table (useful on a new cluster before
a long job)."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields, replace
from typing import Optional

import torch

from kernels import selfcheck


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="beit3-kernel-check", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=selfcheck.__doc__.split("\n\n")[0] + "\n\nShapes default to the giant's on CUDA and "
                    "to the tiny model's on CPU (Triton's interpreter is slow); each option "
                    "overrides one size. Exit status 0 when every check passed, 1 otherwise.")
    p.add_argument("--device", default=None, help="cuda (default when present), cuda:N or cpu")
    p.add_argument("--dtype", nargs="+", choices=sorted(selfcheck.DTYPES), default=None,
                   help="default: bf16 on CUDA, fp16 on CPU (bf16 is wrong under the interpreter)")
    p.add_argument("--kernel", nargs="+", choices=selfcheck.KERNELS, default=list(selfcheck.KERNELS))
    p.add_argument("--no-cache", action="store_true", help="run every check, read and write no cache")
    p.add_argument("--cache", default=None, help=f"cache file (default ${selfcheck.CACHE_ENV} or {selfcheck.DEFAULT_CACHE})")
    for f in (f.name for f in fields(selfcheck.Shapes)):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=None, dest=f)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        # Read when a kernel is defined: set before any Triton module is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    base = selfcheck.Shapes() if device.type == "cuda" else selfcheck.TINY
    shapes = replace(base, **{f.name: getattr(args, f.name) for f in fields(selfcheck.Shapes)
                              if getattr(args, f.name) is not None})
    dtypes = [selfcheck.DTYPES[d] for d in (args.dtype or (["bf16"] if device.type == "cuda" else ["fp16"]))]
    results = selfcheck.run_checks(shapes, dtypes, device, args.kernel, args.cache, not args.no_cache)
    facts = selfcheck.device_facts(device)
    print(f"device {device} ({facts['device']}, {facts['capability']}), torch {facts['torch']}, "
          f"triton {facts['triton']}")
    print(selfcheck.table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
