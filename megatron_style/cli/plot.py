"""`beit3-plot`: the command line over megatron_style.train.plot, which documents it."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from megatron_style.train.plot import plot, read_metrics
import megatron_style.train.plot as lib


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="beit3-plot", description=lib.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", help="metrics.jsonl written by the trainer (in logging.dir)")
    p.add_argument("--out", default="curves.png")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    rows = read_metrics(args.metrics)
    if not rows:
        print(f"error: {args.metrics} has no logged steps", file=sys.stderr)
        return 2
    out = plot(rows, args.out, args.title)
    print(f"wrote {out} ({len(rows)} logged steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
