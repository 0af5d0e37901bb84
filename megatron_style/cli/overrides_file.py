"""The lines of an OVERRIDES_FILE for the launch scripts (cluster/pretrain.sh,
cluster/launch_deepspeed.sh), so that both read it by one rule
(megatron_style.config.read_overrides_file):

    mapfile -d '' -O "${#overrides[@]}" overrides < <(python -m megatron_style.cli.overrides_file FILE)

Each override is written NUL-terminated, since a value may hold spaces (and newlines cannot
occur in one). Exit 2 with the reason on stderr when the file cannot be read."""
from __future__ import annotations

import sys
from typing import Optional

from megatron_style.config import ConfigError, read_overrides_file


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m megatron_style.cli.overrides_file FILE", file=sys.stderr)
        return 2
    try:
        lines = read_overrides_file(args[0])
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    sys.stdout.write("".join(line + "\0" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
