r"""beit3-train-tokenizer: train the tokenizers a pretraining run reads.

    beit3-train-tokenizer text --input corpus1.txt corpus2.txt --vocab-size 64000 --out my.spm
    beit3-train-tokenizer kmeans --images photos/ --img-size 224 --patch-size 16 --k 8192 \
        --out kmeans.pt

`text` trains a SentencePiece model laid out like XLM-R's (the released beit3.spm), so its ids
follow the same scheme (data.tokenizer.text_model). `kmeans` trains the patch k-means visual
tokenizer on image files (data.tokenizer.visual: kmeans, data.tokenizer.visual_model).
The demo needs neither: its tokenizers are trained and cached at first use.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Iterator, Optional

import numpy as np
from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _text(args: argparse.Namespace) -> int:
    from megatron_style.data.text_tokenizer import TextTokenizer, train_sentencepiece

    proto = train_sentencepiece(files=args.input, vocab_size=args.vocab_size,
                                model_type=args.model_type,
                                character_coverage=args.character_coverage,
                                max_sentences=args.max_sentences,
                                hard_vocab_limit=not args.soft_vocab_limit,
                                num_threads=args.threads)
    _write(args.out, proto)
    tok = TextTokenizer(args.out)
    print(f"wrote {args.out}: {tok.num_pieces} pieces, {tok.vocab_size} ids with <mask> "
          f"(scheme {tok.scheme}); set model.text_vocab_size >= {tok.vocab_size}")
    return 0


def _image_files(paths: list[str]) -> list[str]:
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True)
                            if f.lower().endswith(IMAGE_EXTS))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"{p!r} is neither an image file nor a directory")
    return files


def _kmeans(args: argparse.Namespace) -> int:
    from megatron_style.data.errors import BadSample
    from megatron_style.data.transforms import augment
    from megatron_style.data.visual_tokenizers.kmeans import train_kmeans_tokenizer

    files = _image_files(args.images)[:args.max_images]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) under {args.images}")
    rng = np.random.default_rng(args.seed)
    skipped = 0

    def views() -> Iterator:
        nonlocal skipped
        for f in files:
            try:
                with Image.open(f) as im:
                    yield augment(im, args.img_size, None, args.crop_scale, True, 0.0, rng, f)[0]
            except (BadSample, OSError):
                skipped += 1

    tok = train_kmeans_tokenizer(views(), args.patch_size, args.k, iters=args.iters, seed=args.seed,
                                 log=print)
    tok.save(args.out)
    print(f"wrote {args.out}: {args.k} codes for patch {args.patch_size} at {args.img_size}px "
          f"from {len(files) - skipped} images ({skipped} unreadable skipped)")
    return 0


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beit3-train-tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("text", help="train a SentencePiece text tokenizer")
    t.add_argument("--input", nargs="+", required=True, help="text files, one sentence per line")
    t.add_argument("--out", required=True, help="output .model/.spm file")
    t.add_argument("--vocab-size", type=int, default=64000,
                   help="pieces (the released beit3.spm has 64000)")
    t.add_argument("--model-type", choices=("unigram", "bpe", "char", "word"), default="unigram")
    t.add_argument("--character-coverage", type=float, default=0.9995)
    t.add_argument("--max-sentences", type=int, default=10_000_000,
                   help="sentences sampled from the input for training")
    t.add_argument("--soft-vocab-limit", action="store_true",
                   help="allow fewer pieces than --vocab-size (small corpora)")
    t.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    t.set_defaults(run=_text)
    k = sub.add_parser("kmeans", help="train the k-means patch visual tokenizer")
    k.add_argument("--images", nargs="+", required=True, help="image files or directories")
    k.add_argument("--out", required=True, help="output .pt file")
    k.add_argument("--img-size", type=int, required=True, help="model.img_size")
    k.add_argument("--patch-size", type=int, required=True, help="model.patch_size")
    k.add_argument("--k", type=int, required=True, help="codes (model.visual_vocab_size)")
    k.add_argument("--crop-scale", type=float, nargs=2, default=(0.5, 1.0))
    k.add_argument("--max-images", type=int, default=5000)
    k.add_argument("--iters", type=int, default=25)
    k.add_argument("--seed", type=int, default=0)
    k.set_defaults(run=_kmeans)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"beit3-train-tokenizer: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
