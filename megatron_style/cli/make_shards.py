"""`beit3-make-shards`: the command line over megatron_style.data.make_shards, which documents it."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_style.data.make_shards import KINDS, InputError, make_shards, parse_size
from megatron_style.data.tar_samples import ReadLimits


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="beit3-make-shards",
        description="Write webdataset tar shards (img2dataset layout: KEY.jpg, KEY.txt, KEY.json) "
                    "from a folder of images, a CSV/JSONL of (image path, caption), or text "
                    "files with one document per line.")
    p.add_argument("kind", choices=KINDS,
                   help="image: folders or image files; pair: .csv/.tsv/.jsonl tables; "
                        "text: .txt files or folders of them")
    p.add_argument("inputs", nargs="+", help="input files or folders")
    p.add_argument("-o", "--output", required=True, help="folder for the shards")
    p.add_argument("--prefix", default=None, help="shard file prefix (default: the kind)")
    p.add_argument("--max-samples", type=int, default=10_000,
                   help="samples per shard (default 10000)")
    p.add_argument("--max-bytes", type=parse_size, default=parse_size("3GB"),
                   help="close a shard once it has this many bytes, e.g. 500MB (default 3GB)")
    p.add_argument("--image-column", default="image", help="pairs: column of image paths")
    p.add_argument("--caption-column", default="caption", help="pairs: column of captions")
    p.add_argument("--verify", action="store_true",
                   help="decode every image fully and skip broken ones (default: header only)")
    p.add_argument("--max-image-pixels", type=int, default=ReadLimits.max_image_pixels,
                   help="skip images whose header claims more pixels (default %(default)s, "
                        "as training's data.max_image_pixels)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards with the same prefix already in the output folder")
    args = p.parse_args(argv)
    if args.max_samples < 1:
        p.error(f"--max-samples must be >= 1, got {args.max_samples}")
    if args.max_image_pixels < 1:
        p.error(f"--max-image-pixels must be >= 1, got {args.max_image_pixels}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        make_shards(args)
    except InputError as e:
        print(f"beit3-make-shards: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
