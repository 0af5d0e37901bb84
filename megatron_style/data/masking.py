"""Which patches of an image and which tokens of a text are hidden from the model.

Images: BEiT's block-wise masking, as its MaskingGenerator (BEiT, BEiT v2) draws it. A block's
area is uniform between the minimum block size and the number still to hide (the interval
reversed when fewer are left than the minimum), its aspect ratio log-uniform in
[min_aspect, 1/min_aspect]; a block as tall or as wide as the grid is rejected, and so is one
that would hide more than is left; each round tries 10 blocks and adds the first that hides a
new patch. When a round adds nothing, BEiT v2 makes the count exact with single random patches,
so every image of a run hides the same number of patches.

Small grids: the demo's 4x4 grid hides 6 of 16 patches at 40%, with a minimum block of 2 (the
paper's 16 is the whole grid); blocks are then at most 3x3, and what no block can take is
finished with single patches.

Texts: a fixed fraction of the ordinary tokens (never BOS/EOS/pad) is hidden, at least one. The
count is rounded stochastically so that short texts hide the configured fraction on average.
A hidden token becomes <mask> ("mask"), or as in BERT ("bert"): <mask> 80% of the time, a
random ordinary token 10%, itself 10%; every hidden token is a target either way.

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
        added = 0
        for _ in range(attempts):
            # Python's random.uniform(a, b) is a + (b - a) U for a > b too: BEiT's area draw.
            area = min_block + (left - min_block) * rng.random()
            aspect = math.exp(rng.uniform(lo_log, hi_log))
            bh = round(math.sqrt(area * aspect))
            bw = round(math.sqrt(area / aspect))
            if not (bh < h and bw < w):  # BEiT's rule: never as tall or as wide as the grid
                continue
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
    """Block masks for one grid and ratio; the grid comes from the model config. Ratio 0 (a
    pair's image with data.masking.pair_image_ratio 0) hides nothing."""

    def __init__(self, grid: int, ratio: float, min_block: int, min_aspect: float):
        self.grid = grid
        self.num_masked = num_image_masked(grid * grid, ratio) if ratio > 0 else 0
        self.min_block = min_block
        self.min_aspect = min_aspect

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        if self.num_masked == 0:
            return np.zeros(self.grid * self.grid, dtype=bool)
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


class TextCorruptor:
    """What the model reads at the hidden positions of a text (data.masking.text_mode).

    "bert": each hidden token independently becomes <mask> with probability 0.8, a random
    ordinary token (uniform over the vocabulary without BOS/EOS/pad/unk/<mask>) with 0.1, and
    stays itself with 0.1, as in BERT and fairseq's masked LM. "mask": always <mask>."""

    def __init__(self, mode: str, mask_id: int, vocab_size: int, special_ids: Sequence[int]):
        if mode not in ("bert", "mask"):
            raise ValueError(f"text mode {mode!r} is not 'bert' or 'mask'")
        self.mode, self.mask_id = mode, mask_id
        excluded = set(special_ids) | {mask_id}
        self.ordinary = np.array([i for i in range(vocab_size) if i not in excluded], dtype=np.int64)

    def __call__(self, ids: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.array(ids, dtype=np.int64, copy=True)
        where = np.flatnonzero(mask)
        if self.mode == "mask" or self.ordinary.size == 0:
            out[where] = self.mask_id
            return out
        u = rng.random(where.size)
        out[where[u < 0.8]] = self.mask_id
        rand = where[(u >= 0.8) & (u < 0.9)]
        out[rand] = self.ordinary[rng.integers(0, self.ordinary.size, rand.size)]
        return out
