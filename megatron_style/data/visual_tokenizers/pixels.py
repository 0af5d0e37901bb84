"""MAE-style pixel targets: each patch's pixels, normalised by the patch's own mean and
variance (MAE's `norm_pix_loss`, which its paper found gives better representations than raw
pixels). Used with `model.visual_target: pixels` and `data.tokenizer.visual: pixels`."""
from __future__ import annotations

from typing import Optional

import torch

from megatron_style.data.visual_tokenizers.base import VisualTokenizer, patchify


class PixelTargets(VisualTokenizer):
    vocab_size = None

    def __init__(self, patch_size: int, img_size: int, eps: float = 1e-6):
        super().__init__()
        self.patch_size = patch_size
        self.input_size = img_size
        self.eps = eps

    @torch.no_grad()
    def forward(self, images: torch.Tensor,
                tokenizer_images: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = patchify(images.float(), self.patch_size)
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return (x - mean) / (var + self.eps).sqrt()
