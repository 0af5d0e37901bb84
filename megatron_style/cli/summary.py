"""`beit3-summary`: the command line over megatron_style.model.summary, which documents it."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_style.config import ConfigError, MODEL_PRESETS, parse_override
from megatron_style.model.summary import dump_presets, summary_text
import megatron_style.model.summary as lib


def _overrides(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        path, value = parse_override(item)
        if path[0] == "model":
            path = path[1:]
        if len(path) != 1:
            raise ConfigError(f"override {item!r}: expected a model field, e.g. layers=4")
        out[path[0]] = value
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="beit3-summary", description=lib.__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(MODEL_PRESETS), default=None,
                    help="model preset (default: the ModelConfig defaults)")
    ap.add_argument("--text-len", type=int, default=64, help="text length for the FLOPs of a "
                    "text and a pair (tokens)")
    ap.add_argument("--dump-presets", metavar="DIR", help="write DIR/<preset>.yaml and exit")
    ap.add_argument("overrides", nargs="*", help="model fields, e.g. layers=4 dim=512")
    a = ap.parse_args(argv)
    if a.dump_presets:
        for p in dump_presets(a.dump_presets):
            print(p)
        return 0
    try:
        print(summary_text(a.preset, _overrides(a.overrides), a.text_len))
    except ValueError as e:  # ConfigError included: a bad override or text length
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
