"""Which patches of an image and which tokens of a text are hidden from the model.

Images: BEiT's block-wise masking. Rectangles of patches (area drawn between a minimum block
size and what is still left to hide, aspect ratio log-uniform in [min_aspect, 1/min_aspect]) are
added until the target count is reached; as in BEiT v2, the count is then made exact with single
random patches, so every image of a run hides the same number of patches.

Small grids: the demo's 4x4 grid hides 6 of 16 patches at 40%, while the paper's minimum block is
16 patches. The minimum block is therefore clamped to the number of patches still to hide, and a
block's sides to the grid (BEiT rejects blocks as wide or tall as the grid; here they are allowed),
so a tiny grid gets one or two contiguous blocks instead of scattered single patches.

Texts: a fixed fraction of the ordinary tokens (never BOS/EOS/pad) is hidden, at least one, and
replaced by the tokenizer's mask id. The count is rounded stochastically so that short texts
hide the configured fraction on average.

Everything draws from the numpy Generator it is given: same generator state, same mask.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from megatron_style.data.errors import BadSample


def num_image_masked(num_patches: int, ratio: float) -> int:
    """Patches hidden per image: round(ratio * P), at least 1 and at most P - 1 so that the
    model always sees something and always has something to predict."""
    return int(min(max(1, round(ratio * num_patches)), max(1, num_patches - 1)))


def block_image_mask(grid: int | tuple[int, int], num_masked: int, min_block: int,
                     min_aspect: float, rng: np.random.Generator,
                     attempts: int = 10) -> np.ndarray:
    """A [H*W] bool mask (row-major over the patch grid) with exactly `num_masked` True."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    P = h * w
    if not 0 <= num_masked <= P:
        raise ValueError(f"num_masked={num_masked} must be in [0, {P}] for a {h}x{w} grid")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"min_aspect={min_aspect} must be in (0, 1]")
    mask = np.zeros((h, w), dtype=bool)
    lo_log, hi_log = math.log(min_aspect), -math.log(min_aspect)
    count = 0
    while count < num_masked:
        left = num_masked - count
        # Clamp the minimum block (see the module doc): never larger than what is left to hide.
        lo = min(max(1, min_block), left)
        added = 0
        for _ in range(attempts):
            area = rng.uniform(lo, left) if left > lo else float(lo)
            aspect = math.exp(rng.uniform(lo_log, hi_log))
            bh = min(h, max(1, round(math.sqrt(area * aspect))))
            bw = min(w, max(1, round(math.sqrt(area / aspect))))
            top = int(rng.integers(0, h - bh + 1))
            lft = int(rng.integers(0, w - bw + 1))
            window = mask[top:top + bh, lft:lft + bw]
            new = bh * bw - int(window.sum())
            if 0 < new <= left:
                window[...] = True
                added = new
                break
        if added == 0:
            break
        count += added
    flat = mask.reshape(-1)
    if count < num_masked:
        # Blocks no longer fit (a crowded small grid): finish with single patches.
        free = np.flatnonzero(~flat)
        flat[rng.choice(free, num_masked - count, replace=False)] = True
    return flat


class ImageMasker:
    """Block masks for one grid and ratio; the grid comes from the model config."""

    def __init__(self, grid: int, ratio: float, min_block: int, min_aspect: float):
        self.grid = grid
        self.num_masked = num_image_masked(grid * grid, ratio)
        self.min_block = min_block
        self.min_aspect = min_aspect

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        return block_image_mask(self.grid, self.num_masked, self.min_block, self.min_aspect, rng)


def text_mask(ids: Sequence[int], special_ids: Sequence[int], ratio: float,
              rng: np.random.Generator, source: str = "") -> np.ndarray:
    """A [L] bool mask hiding round(ratio * n) of the n ordinary tokens (stochastic rounding,
    at least one). Raises BadSample("empty_text") when there is no ordinary token."""
    ids = np.asarray(ids)
    candidates = np.flatnonzero(~np.isin(ids, np.asarray(special_ids, dtype=ids.dtype)))
    n = candidates.size
    if n == 0:
        raise BadSample("empty_text", "no token besides BOS/EOS/pad to mask", source)
    k = int(math.floor(ratio * n + rng.random()))
    k = min(max(1, k), n)
    mask = np.zeros(ids.shape[0], dtype=bool)
    mask[rng.choice(candidates, k, replace=False)] = True
    return mask
