"""Visual tokenizers: what the image head of masked data modeling predicts.

  vqkd    BEiT v2's VQ-KD (ViT-B/16 + 8192 x 32 codebook), as in BEiT-3; needs its checkpoint
  kmeans  nearest of K centroids of pooled patch pixels; trains on a CPU (demo default)
  pixels  MAE-style per-patch normalised pixels (model.visual_target: pixels)

`data/build_tokenizers.py` picks one for a run; `tokenizer_input_size(cfg)` tells the data
side (which must not build a ViT-B in every loader worker) whether to produce
`tokenizer_image`s and at what resolution.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from megatron_style.data.visual_tokenizers.base import VisualTokenizer, patchify
from megatron_style.data.visual_tokenizers.kmeans import KMeansTokenizer, train_kmeans_tokenizer
from megatron_style.data.visual_tokenizers.pixels import PixelTargets
from megatron_style.data.visual_tokenizers.vqkd import VQKD_PATCH_SIZE, VQKDTokenizer, load_vqkd

if TYPE_CHECKING:
    from megatron_style.config import PretrainConfig

__all__ = ["VisualTokenizer", "KMeansTokenizer", "PixelTargets", "VQKDTokenizer",
           "tokenizer_input_size", "load_vqkd",
           "train_kmeans_tokenizer", "patchify"]


def tokenizer_input_size(cfg: "PretrainConfig") -> Optional[int]:
    """Resolution of the tokenizer's own view of each image, or None when it reads the model's.
    VQ-KD always gets its own view, as BEiT v2 prepares it: the same crop resized with lanczos
    and left in [0, 1], at 16 g pixels for a grid of g patches (its patch is 16): 224 px for
    base's 14 x 14 grid, 256 px for the giant's 16 x 16 (that resolution is our assumption: the
    paper does not say how VQ-KD met the giant's patch-14 grid)."""
    if cfg.data.tokenizer.visual != "vqkd":
        return None
    return cfg.model.grid * VQKD_PATCH_SIZE
