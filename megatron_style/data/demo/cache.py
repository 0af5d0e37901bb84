"""The demo's tokenizers: trained on generated data at first use, then read from the cache.

Files live in `data.tokenizer.cache_dir`/demo/, named by a hash of every setting that changes
them (generator version, sizes, vocabulary, augmentation), so a changed setting trains a new one
and never reads a stale one. Several ranks starting at once: an exclusive lock on a side file
lets one of them train while the others wait and then read; the file itself is written under a
temporary name and renamed, so nobody ever reads half of it (also on file systems where the
lock is not shared between machines: then each machine may train once, harmlessly).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import TYPE_CHECKING, Callable

import numpy as np

from megatron_style.config import ConfigError
from megatron_style.data.demo.scenes import GENERATOR_VERSION
from megatron_style.data.demo.source import DemoSource
from megatron_style.data.text_tokenizer import TextTokenizer, train_sentencepiece
from megatron_style.data.transforms import augment
from megatron_style.data.visual_tokenizers.kmeans import (KMeansTokenizer, default_cells,
                                                          train_kmeans_tokenizer)

try:
    import fcntl
except ImportError:  # not POSIX: write-then-rename alone keeps readers safe
    fcntl = None

if TYPE_CHECKING:
    from megatron_style.config import PretrainConfig

# Fixed seeds: the demo tokenizers are the same for every run (only the sizes key them).
CORPUS_SEED = 1_000_003
KMEANS_SEED = 1_000_033
CORPUS_SENTENCES = 20_000


def cache_file(cfg: "PretrainConfig", name: str, settings: dict, ext: str) -> str:
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    root = os.path.join(os.path.expanduser(cfg.data.tokenizer.cache_dir), "demo")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data.tokenizer.cache_dir: cannot create {root!r} ({e}); point it at "
                          "a writable directory") from None
    return os.path.join(root, f"{name}-{key}.{ext}")


def build_once(path: str, build: Callable[[str], None]) -> str:
    """Make `path` with `build(tmp_path)` unless it exists; one builder at a time."""
    if os.path.exists(path):
        return path
    with open(path + ".lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.exists(path):
                tmp = f"{path}.tmp{os.getpid()}"
                try:
                    build(tmp)
                    os.replace(tmp, path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(tmp)
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def demo_text_tokenizer(cfg: "PretrainConfig") -> TextTokenizer:
    """A BPE SentencePiece model (whole words for the demo's small vocabulary) trained on
    generated sentences."""
    vocab = cfg.data.tokenizer.demo_text_vocab_size
    settings = {"v": GENERATOR_VERSION, "what": "spm-bpe", "vocab": vocab,
                "sentences": CORPUS_SENTENCES, "seed": CORPUS_SEED}
    path = cache_file(cfg, "text", settings, "model")

    def build(tmp: str) -> None:
        corpus = DemoSource(64, CORPUS_SEED).sentences(CORPUS_SENTENCES)
        # Soft limit: the demo language has fewer distinct pieces than the requested size.
        proto = train_sentencepiece(corpus, vocab_size=vocab, model_type="bpe",
                                    character_coverage=1.0, hard_vocab_limit=False)
        with open(tmp, "wb") as f:
            f.write(proto)

    return TextTokenizer(build_once(path, build), scheme="xlmr")


def demo_kmeans_tokenizer(cfg: "PretrainConfig") -> KMeansTokenizer:
    """K = model.visual_vocab_size centroids of patches of augmented demo images."""
    m, d = cfg.model, cfg.data
    n_images = d.tokenizer.demo_kmeans_images
    cells = default_cells(m.patch_size)
    settings = {"v": GENERATOR_VERSION, "what": "kmeans", "img": m.img_size, "patch": m.patch_size,
                "k": m.visual_vocab_size, "images": n_images, "cells": cells,
                "crop": list(d.crop_scale), "jitter": d.color_jitter, "seed": KMEANS_SEED}
    path = cache_file(cfg, "kmeans", settings, "pt")

    def build(tmp: str) -> None:
        src = DemoSource(m.img_size, KMEANS_SEED)
        rng = np.random.default_rng(KMEANS_SEED)
        views = (augment(src.sample("image", i).image, m.img_size, None, d.crop_scale,
                         d.flips("image"), d.color_jitter, rng)[0] for i in range(n_images))
        train_kmeans_tokenizer(views, m.patch_size, m.visual_vocab_size, cells=cells,
                               seed=KMEANS_SEED).save(tmp)

    return KMeansTokenizer.load(build_once(path, build))
