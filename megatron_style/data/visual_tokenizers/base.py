"""The one interface of visual tokenizers: images in, one target per patch out.

`forward(images, tokenizer_images=None)`:
  images            [n, 3, H, W], the model's input (normalised to [-1, 1], see transforms.py)
  tokenizer_images  [n, 3, T, T] in [0, 1], the same crops at the tokenizer's resolution, given
                    when `needs_tokenizer_images` (e.g. VQ-KD, patch 16, under a patch-14 model);
                    otherwise None (passing `images` itself again is accepted and means the same)
returns           [n, P] long ids in [0, vocab_size), or [n, P, patch_dim] float targets
                  (`vocab_size` None), P = the model's patches, row-major over the grid.

Tokenizers run on the training device in inference mode; their parameters are never trained
by the pretraining loop (`requires_grad` is off).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class VisualTokenizer(nn.Module):
    #: number of visual-token ids, None for continuous (pixel) targets
    vocab_size: Optional[int] = None
    #: resolution of the images the tokenizer reads
    input_size: int = 0
    #: True when it reads `tokenizer_images` (its resolution differs from the model's)
    needs_tokenizer_images: bool = False

    def forward(self, images: torch.Tensor,
                tokenizer_images: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def freeze(self) -> "VisualTokenizer":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "VisualTokenizer":
        # Always in inference mode: a trainer calling model.train() on a parent must not
        # switch on anything here.
        return super().train(False)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[n, C, H, W] -> [n, P, patch * patch * C], pixels of each patch in (row, column, channel)
    order (MAE's layout), patches row-major."""
    n, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    gh, gw = h // patch, w // patch
    x = images.reshape(n, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, patch * patch * c)
