"""Visual tokenizers: what the image head of masked data modeling predicts.

  vqkd    BEiT v2's VQ-KD (ViT-B/16 + 8192 x 32 codebook), as in BEiT-3; needs its checkpoint
  kmeans  nearest of K centroids of pooled patch pixels; trains on a CPU (demo default)
  pixels  MAE-style per-patch normalised pixels (model.visual_target: pixels)

`build_visual_tokenizer(cfg)` picks one; `tokenizer_input_size(cfg)` tells the data side (which
must not build a ViT-B in every loader worker) whether to produce `tokenizer_image`s and at what
resolution.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from megatron_style.config import ConfigError
from megatron_style.data.visual_tokenizers.base import VisualTokenizer, patchify
from megatron_style.data.visual_tokenizers.kmeans import KMeansTokenizer, train_kmeans_tokenizer
from megatron_style.data.visual_tokenizers.pixels import PixelTargets
from megatron_style.data.visual_tokenizers.vqkd import VQKD_PATCH_SIZE, VQKDTokenizer, load_vqkd

if TYPE_CHECKING:
    from megatron_style.config import PretrainConfig

__all__ = ["VisualTokenizer", "KMeansTokenizer", "PixelTargets", "VQKDTokenizer",
           "build_visual_tokenizer", "tokenizer_input_size", "load_vqkd",
           "train_kmeans_tokenizer", "patchify"]


def tokenizer_input_size(cfg: "PretrainConfig") -> Optional[int]:
    """Resolution of the images the visual tokenizer reads when it is not the model's own
    (VQ-KD has patch 16, so a grid of g patches needs 16 g pixels); None otherwise."""
    if cfg.data.tokenizer.visual != "vqkd":
        return None
    size = cfg.model.grid * VQKD_PATCH_SIZE
    return None if size == cfg.model.img_size else size


def build_visual_tokenizer(cfg: "PretrainConfig") -> VisualTokenizer:
    """The run's visual tokenizer, frozen, on the CPU (the trainer moves it to its device)."""
    tc, m = cfg.data.tokenizer, cfg.model  # their agreement: config/checks.py
    if tc.visual == "pixels":
        return PixelTargets(m.patch_size, m.img_size).freeze()
    if tc.visual == "vqkd":
        tok = load_vqkd(tc.visual_model, grid=m.grid, model_img_size=m.img_size)
        if tok.patch_size != VQKD_PATCH_SIZE:
            raise ConfigError(f"data.tokenizer.visual_model: VQ-KD patch size {tok.patch_size}, "
                              f"only {VQKD_PATCH_SIZE} (BEiT v2's) is supported")
    elif tc.visual_model:
        tok = KMeansTokenizer.load(tc.visual_model)
        if tok.patch_size != m.patch_size or tok.input_size != m.img_size:
            raise ConfigError(
                f"data.tokenizer.visual_model: the k-means tokenizer {tc.visual_model!r} was "
                f"trained for patch {tok.patch_size} at {tok.input_size}px, the model uses patch "
                f"{m.patch_size} at {m.img_size}px; train one for these sizes")
    elif cfg.data.source != "shards":
        from megatron_style.data.demo.cache import demo_kmeans_tokenizer
        tok = demo_kmeans_tokenizer(cfg)
    else:  # train/preflight.py says so before start-up; this is for callers without it
        raise ConfigError("data.tokenizer.visual_model: visual: kmeans with data.source shards "
                          "needs a trained k-means tokenizer (beit3-train-tokenizer kmeans)")
    if tok.vocab_size > m.visual_vocab_size:
        raise ConfigError(f"model.visual_vocab_size: the visual tokenizer has {tok.vocab_size} "
                          f"codes, more than model.visual_vocab_size={m.visual_vocab_size}; "
                          f"raise it to {tok.vocab_size}")
    return tok.freeze()
