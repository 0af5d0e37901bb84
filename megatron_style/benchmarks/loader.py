"""How fast is the data path on this machine, and does it keep up with training?

    python -m megatron_style.benchmarks.loader                      # both measurements
    python -m megatron_style.benchmarks.loader --train-steps-per-s 1.8 --micro-batch-size 24

1. Per loader worker: images per second for JPEG decode + augmentation (random-resized-crop,
   flip) + block masking of patches, the image half of the sample processor, in one process.
2. The training loader (build_train_loader over tar shards written here, the real processor,
   `--workers` DataLoader workers): samples per second, set against what training consumes
   (`--train-steps-per-s` x micro-batch size, or `--train-samples-per-s`), with their ratio.
   A ratio above 1 means the loader keeps up.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
from PIL import Image


def photo_like_jpeg(i: int, size: int, quality: int = 90) -> bytes:
    """A JPEG of about the size and entropy of a web photo: smooth gradients, a few blobs and
    sensor-like noise (pure noise would be far larger, a flat colour far smaller)."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 60 * np.sin(3 * a * x + 2 * b * y + 6 * p)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
        img[blob] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def bench_cfg(args: argparse.Namespace, shards: Optional[dict[str, str]] = None):
    from megatron_style.config import load_config
    over = [f"model.preset={args.model}", f"data.micro_batch_size={args.micro_batch_size}",
            f"data.num_workers={args.workers}", "data.shuffle_buffer=64"]
    if shards:
        # The loader alone: no visual tokenizer runs here (k-means and pixel targets both
        # need no tokenizer view), so the run needs no trained k-means file.
        over += ["data.source=shards", "data.tokenizer.visual=pixels", "model.visual_target=pixels"]
        over += [f"data.{s}.shards={p}" for s, p in shards.items()]
    return load_config(None, over)


def make_processor(cfg):
    from megatron_style.data.demo.cache import demo_text_tokenizer
    from megatron_style.data.processor import SampleProcessor
    # The demo's small SentencePiece model: the text side costs the same order with any model.
    return SampleProcessor(cfg, demo_text_tokenizer(bench_cfg_demo(cfg)))


def bench_cfg_demo(cfg):
    import dataclasses
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="demo"))


def images_per_worker(args: argparse.Namespace) -> float:
    """One process: decode + augment + mask, images per second."""
    cfg = bench_cfg(args)
    processor = make_processor(cfg)
    blobs = [photo_like_jpeg(i, args.source_size) for i in range(args.images)]
    rng = np.random.default_rng(0)
    for b in blobs[:5]:  # warm-up
        processor.image_views(Image.open(io.BytesIO(b)), rng, "image")
    t0 = time.perf_counter()
    for b in blobs:
        processor.image_views(Image.open(io.BytesIO(b)), rng, "image")
        processor.image_maskers["image"](rng)
    rate = len(blobs) / (time.perf_counter() - t0)
    kb = sum(map(len, blobs)) / len(blobs) / 1024
    print(f"[1] decode + augment + mask, one worker: {rate:.0f} images/s "
          f"({args.source_size}px JPEG of {kb:.0f} KB -> {cfg.model.img_size}px, "
          f"patch {cfg.model.patch_size}, {args.images} images)")
    return rate


def write_bench_shards(folder: str, args: argparse.Namespace) -> dict[str, str]:
    import webdataset as wds
    words = "a photo of the red small dog cat house tree near over under blue green".split()
    out = {}
    for stream in ("image", "text", "pair"):
        pattern = os.path.join(folder, f"{stream}-%04d.tar")
        with wds.ShardWriter(pattern, maxcount=64, verbose=0) as w:
            for i in range(args.shard_samples):
                rng = np.random.default_rng(i)
                sample = {"__key__": f"{i:09d}"}
                if stream != "text":
                    sample["jpg"] = photo_like_jpeg(i, args.source_size)
                if stream != "image":
                    n = 12 if stream == "pair" else 60
                    sample["txt"] = " ".join(rng.choice(words, n))
                w.write(sample)
        out[stream] = os.path.join(folder, f"{stream}-*.tar")
    return out


def loader_samples_per_s(args: argparse.Namespace) -> float:
    from megatron_style.data.loader import build_train_loader, measure
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_cfg(args, write_bench_shards(tmp, args))
        loader = build_train_loader(cfg, 0, 1, make_processor(cfg))
        rate = measure(loader, args.batches)
    print(f"[2] training loader, {args.workers} workers, micro-batch {args.micro_batch_size} "
          f"({'/'.join(str(v) for v in cfg.data.stream_counts().values())} image/text/pair): "
          f"{rate:.0f} samples/s")
    return rate


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megatron_style.benchmarks.loader",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base", help="model preset (image and patch size)")
    p.add_argument("--source-size", type=int, default=224, help="side of the JPEGs, pixels")
    p.add_argument("--images", type=int, default=200, help="images for measurement 1")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for measurement 2")
    p.add_argument("--micro-batch-size", type=int, default=24)
    p.add_argument("--batches", type=int, default=20, help="micro-batches timed in measurement 2")
    p.add_argument("--shard-samples", type=int, default=256, help="samples per stream in shards")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--train-steps-per-s", type=float, default=None,
                   help="micro-batch steps per second one training rank runs (from the trainer)")
    g.add_argument("--train-samples-per-s", type=float, default=None,
                   help="samples per second one training rank consumes")
    p.add_argument("--skip", choices=("workers", "loader"), default=None,
                   help="leave out one of the two measurements")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import torch
    torch.set_num_threads(1)  # as in a DataLoader worker
    print(f"machine: {os.cpu_count()} CPU cores")
    if args.skip != "workers":
        images_per_worker(args)
    if args.skip == "loader":
        return 0
    rate = loader_samples_per_s(args)
    need = args.train_samples_per_s
    if args.train_steps_per_s is not None:
        need = args.train_steps_per_s * args.micro_batch_size
    if need is None:
        print("training consumption: not given (--train-steps-per-s or --train-samples-per-s)")
    else:
        print(f"training consumes {need:.0f} samples/s; loader / training = {rate / need:.2f}"
              f" ({'keeps up' if rate >= need else 'the loader is the bottleneck'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
