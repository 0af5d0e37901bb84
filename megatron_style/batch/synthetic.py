"""Random masked samples of every kind, for tests, benchmarks and memory measurements."""
from __future__ import annotations

from typing import Optional

import torch

from megatron_style.config import ModelConfig
from megatron_style.batch import PackedBatch, Sample, pack_samples


def random_sample(cfg: ModelConfig, kind: str, text_len: int = 12, g: Optional[torch.Generator] = None,
                  image_ratio: float = 0.4, text_ratio: float = 0.15,
                  pair_image_ratio: Optional[float] = None) -> Sample:
    """`pair_image_ratio`: patches hidden in a pair's image (default: image_ratio; 0 hides
    none, as data.masking.pair_image_ratio 0 does)."""
    s = Sample(source=f"synthetic/{kind}")
    P = cfg.num_patches
    if kind in ("image", "pair"):
        s.image = torch.randn(cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
        ratio = image_ratio if kind == "image" or pair_image_ratio is None else pair_image_ratio
        n = max(1, round(ratio * P)) if ratio > 0 else 0
        s.image_mask = torch.zeros(P, dtype=torch.bool)
        s.image_mask[torch.randperm(P, generator=g)[:n]] = True
        if cfg.visual_target == "tokens":
            s.image_targets = torch.randint(0, cfg.visual_vocab_size, (P,), generator=g)
        else:
            s.image_targets = torch.randn(P, cfg.patch_dim, generator=g)
    if kind in ("text", "pair"):
        ids = torch.randint(0, cfg.text_vocab_size, (text_len,), generator=g)
        ratio = 0.5 if kind == "pair" else text_ratio
        s.text_mask = torch.zeros(text_len, dtype=torch.bool)
        s.text_mask[torch.randperm(text_len, generator=g)[:max(1, round(ratio * text_len))]] = True
        s.text_targets = ids.clone()
        s.text = ids.masked_fill(s.text_mask, 3)
    return s


def random_batch(cfg: ModelConfig, images: int = 2, texts: int = 2, pairs: int = 2,
                 text_lens: tuple[int, int] = (4, 16), seed: int = 0) -> PackedBatch:
    """A packed batch with the given number of samples of each kind, shuffled together,
    texts of random lengths in [text_lens[0], text_lens[1]]."""
    g = torch.Generator().manual_seed(seed)
    hi = min(text_lens[1], cfg.max_text_len)
    kinds = ["image"] * images + ["text"] * texts + ["pair"] * pairs
    order = torch.randperm(len(kinds), generator=g).tolist()
    samples = []
    for i in order:
        L = int(torch.randint(text_lens[0], hi + 1, (1,), generator=g))
        samples.append(random_sample(cfg, kinds[i], L, g))
    return pack_samples(samples, cfg)
