"""Write webdataset tar shards (img2dataset's layout) from local files.

    beit3-make-shards image  photos/                 -o shards/images
    beit3-make-shards pair   captions.csv            -o shards/pairs --max-samples 10000
    beit3-make-shards pair   captions.jsonl          -o shards/pairs --max-bytes 1GB
    beit3-make-shards text   corpus.txt more/*.txt   -o shards/texts

Samples are `KEY.jpg` (or .png / .webp: image bytes are copied, not re-encoded), `KEY.txt` (the
caption, or one document per line of the text files), and for pairs `KEY.json` (the source
path and any other columns). Keys count up from 000000000 as img2dataset's do. A CSV or JSONL
of pairs names an image path (relative paths are relative to that file) and a caption per row;
rows whose image is missing or unreadable, or whose caption is empty, are skipped and counted.
Images are checked as training reads them (tar_samples.open_image): formats Pillow identifies
but shards should not hold (EPS runs Ghostscript) and images with more pixels than
--max-image-pixels (decompression bombs: a 20 KB PNG may claim 13000^2 pixels) are skipped and
counted, never decoded.
The shards are written by webdataset's ShardWriter; a shard closes when it holds
--max-samples samples or has reached --max-bytes (so it can pass that by one sample). They are
written into a hidden folder beside the output and moved into place only once the whole set is
written: a run that fails or is killed half-way leaves the previous shards as they were.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import sys
import warnings
from collections import Counter
from typing import Iterator, Optional, Sequence

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from megatron_style.data.tar_samples import ReadLimits

COPIED_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
# Found in image folders too; re-encoded as JPEG since the readers take jpg/png/webp only.
OTHER_IMAGE_EXTS = (".bmp", ".gif", ".tif", ".tiff")
#: What an input image may be by its bytes (the readers take the first three, the others are
#: re-encoded); the rest of Pillow's formats are refused unopened.
INPUT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
KINDS = ("image", "pair", "text")


class ImageTooLarge(ValueError):
    """An input image whose header claims more pixels than --max-image-pixels."""


class InputError(ValueError):
    """The input cannot be turned into shards; the message says why and what would work."""


def parse_size(text: str) -> int:
    """'500MB', '1.5GB', '1e9', '4096' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    units = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    try:
        value = float(m.group(1))  # type: ignore[union-attr]
        unit = (m.group(2) or "").upper()  # type: ignore[union-attr]
        factor = units[unit[:1]] * (1.024 ** "_KMGT".index(unit[0]) if "I" in unit else 1)
    except (AttributeError, ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 500MB, 1GB, 1e9") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0, got {text!r}")
    return int(value * factor)


# -- reading inputs ---------------------------------------------------------------------------

def image_member(path: str, verify: bool,
                 max_pixels: int = ReadLimits.max_image_pixels) -> tuple[str, bytes]:
    """(extension, bytes) of an image file for a shard. Raises ImageTooLarge, or another
    exception when the file is unreadable."""
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        data = f.read()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)  # the header at least
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageTooLarge(str(e)) from None
    with img:
        if img.width * img.height > max_pixels:
            raise ImageTooLarge(f"{img.width}x{img.height} pixels, more than "
                                f"--max-image-pixels={max_pixels}")
        if verify:
            img.load()
        if ext in COPIED_EXTS:
            return COPIED_EXTS[ext], data
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=95)
        return "jpg", buf.getvalue()


def find_images(inputs: Sequence[str]) -> list[str]:
    exts = tuple(COPIED_EXTS) + OTHER_IMAGE_EXTS
    found = []
    for inp in inputs:
        if os.path.isdir(inp):
            for root, dirs, files in os.walk(inp):
                dirs.sort()
                found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(exts)]
        else:
            found.append(inp)
    return found


def read_pair_rows(path: str, image_col: str, caption_col: str) -> list[dict]:
    """Rows of a .csv / .tsv (with a header) or .jsonl file, each with the two columns."""
    lower = path.lower()
    if lower.endswith((".jsonl", ".json")):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}:{n}: not a JSON object per line ({e})") from None
        columns = set().union(*(r.keys() for r in rows)) if rows else set()
    elif lower.endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if lower.endswith(".tsv") else ",")
            rows = list(reader)
            columns = set(reader.fieldnames or [])
    else:
        raise InputError(f"{path}: pairs are read from a .csv, .tsv or .jsonl file")
    for col, flag in ((image_col, "--image-column"), (caption_col, "--caption-column")):
        if col not in columns:
            raise InputError(f"{path} has no column {col!r} (it has {sorted(columns)}); "
                             f"name the right one with {flag}")
    return rows


def text_documents(inputs: Sequence[str]) -> Iterator[str]:
    files = []
    for inp in inputs:
        if os.path.isdir(inp):
            files += sorted(os.path.join(inp, f) for f in os.listdir(inp) if f.endswith(".txt"))
        else:
            files.append(inp)
    for path in files:
        with open(path, encoding="utf-8") as f:
            try:
                yield from f
            except UnicodeDecodeError as e:
                raise InputError(f"{path} is not UTF-8 text ({e}); convert it first, e.g. "
                                 "with iconv") from None


# -- writing ----------------------------------------------------------------------------------

class Shards:
    """webdataset's ShardWriter plus keys, counts and a summary."""

    def __init__(self, out: str, prefix: str, max_samples: int, max_bytes: int) -> None:
        os.makedirs(out, exist_ok=True)
        self.out, self.prefix = out, prefix
        self.pattern = os.path.join(out, f"{prefix}-%06d.tar")
        self.writer = wds.ShardWriter(self.pattern, maxcount=max_samples, maxsize=max_bytes,
                                      verbose=0)
        self.written = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def write(self, members: dict) -> None:
        self.writer.write({"__key__": f"{self.written:09d}", **members})
        self.written += 1

    def skip(self, reason: str, what: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, what)

    def close(self) -> list[str]:
        n = self.writer.shard  # shards opened so far (close() forgets it)
        self.writer.close()
        paths = [self.pattern % i for i in range(n)]
        if self.written == 0:
            for p in paths:
                if os.path.exists(p):
                    os.remove(p)
            return []
        return paths


def read_image(path: str, shards: Shards, verify: bool,
               max_pixels: int) -> Optional[tuple[str, bytes]]:
    """image_member, or None with the reason counted: one bad input file never stops the run."""
    try:
        return image_member(path, verify, max_pixels)
    except ImageTooLarge as e:
        shards.skip("image too large", f"{path}: {e}")
    except Exception as e:  # whatever Pillow raises on this file, MemoryError included
        shards.skip("unreadable image", f"{path}: {type(e).__name__}: {e}")
    return None


def write_images(inputs: Sequence[str], shards: Shards, verify: bool,
                 max_pixels: int = ReadLimits.max_image_pixels) -> None:
    for path in tqdm(find_images(inputs), unit="image", desc="images", disable=None):
        member = read_image(path, shards, verify, max_pixels)
        if member is not None:
            shards.write({member[0]: member[1]})


def write_pairs(inputs: Sequence[str], shards: Shards, verify: bool, image_col: str,
                caption_col: str, max_pixels: int = ReadLimits.max_image_pixels) -> None:
    for table in inputs:
        base = os.path.dirname(os.path.abspath(table))
        rows = read_pair_rows(table, image_col, caption_col)
        for row in tqdm(rows, unit="pair", desc=os.path.basename(table), disable=None):
            image, caption = str(row.get(image_col) or ""), str(row.get(caption_col) or "").strip()
            path = os.path.join(base, os.path.expanduser(image))
            if not caption:
                shards.skip("empty caption", image)
                continue
            if not image or not os.path.isfile(path):
                shards.skip("missing image", path)
                continue
            member = read_image(path, shards, verify, max_pixels)
            if member is None:
                continue
            ext, data = member
            meta = {k: v for k, v in row.items() if k not in (image_col, caption_col)}
            meta.update(key=f"{shards.written:09d}", image=image)
            shards.write({ext: data, "txt": caption, "json": json.dumps(meta).encode()})


def write_texts(inputs: Sequence[str], shards: Shards) -> None:
    for line in tqdm(text_documents(inputs), unit="doc", desc="texts", disable=None):
        doc = line.strip()
        if doc:
            shards.write({"txt": doc})
        else:
            shards.skip("empty line", "")


def make_shards(args: argparse.Namespace) -> list[str]:
    for inp in args.inputs:
        if not os.path.exists(inp):
            raise InputError(f"input {inp!r} does not exist")
    prefix = args.prefix or args.kind
    old = old_shards(args.output, prefix)
    if old and not args.overwrite:
        raise InputError(f"{args.output!r} already has {len(old)} '{prefix}-*.tar' shards; "
                         "pass --overwrite, another --prefix, or another --output")
    # The new set is written aside and replaces the old one only when complete.
    staging = os.path.join(args.output, f".{prefix}-partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    shards = Shards(staging, prefix, args.max_samples, args.max_bytes)
    try:
        try:
            if args.kind == "image":
                write_images(args.inputs, shards, args.verify, args.max_image_pixels)
            elif args.kind == "pair":
                write_pairs(args.inputs, shards, args.verify, args.image_column,
                            args.caption_column, args.max_image_pixels)
            else:
                write_texts(args.inputs, shards)
        finally:
            staged = shards.close()
        for reason, n in sorted(shards.skipped.items()):
            print(f"skipped {n} ({reason}), e.g. {shards.examples[reason]}", file=sys.stderr)
        if not staged:
            raise InputError(f"no {args.kind} samples found in {', '.join(args.inputs)}")
        paths = publish(staged, args.output, old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    pattern = os.path.join(args.output, f"{prefix}-{{{0:06d}..{len(paths) - 1:06d}}}.tar")
    print(f"wrote {shards.written} {args.kind} samples in {len(paths)} shards: {pattern}")
    return paths


def old_shards(folder: str, prefix: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder)
                  if re.fullmatch(rf"{re.escape(prefix)}-\d+\.tar", f))


def publish(staged: list[str], folder: str, old: list[str]) -> list[str]:
    """Move the complete new set into `folder` (each rename atomic, replacing the old shard of
    that name), then remove old shards the new set has no counterpart for: a smaller new set
    must not leave old shards behind for a directory spec."""
    paths = []
    for p in staged:
        dest = os.path.join(folder, os.path.basename(p))
        os.replace(p, dest)
        paths.append(dest)
    new = {os.path.basename(p) for p in paths}
    for f in old:
        if f not in new:
            os.remove(os.path.join(folder, f))
    return paths
