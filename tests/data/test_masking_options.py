"""The masking options of issue 14: pair images masked or not (data.masking.pair_image_ratio),
BERT's 80/10/10 or always <mask> for hidden text tokens (text_mode), and BEiT's block-masking
generator, blocks as tall or as wide as the grid rejected."""
from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_style.data.demo import DemoSource
from megatron_style.data.masking import TextCorruptor, block_image_mask
from megatron_style.data.processor import SampleProcessor
from megatron_style.data.build_tokenizers import build_text_tokenizer


def beit_generator(h, w, num_masked, min_block, min_aspect, rng):
    """BEiT v2's MaskingGenerator (unilm beit2/masking_generator.py) written out as it is
    there, with its random.uniform / random.randint / np.random.choice replaced by the same
    draws from `rng`, so that the two can be compared mask for mask."""
    mask = np.zeros((h, w), dtype=np.int32)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _mask(max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = min_block + (max_mask_patches - min_block) * rng.random()
            aspect_ratio = math.exp(rng.uniform(*log_aspect))
            bh = int(round(math.sqrt(target_area * aspect_ratio)))
            bw = int(round(math.sqrt(target_area / aspect_ratio)))
            if bw < w and bh < h:
                top = int(rng.integers(0, h - bh + 1))
                left = int(rng.integers(0, w - bw + 1))
                num = mask[top: top + bh, left: left + bw].sum()
                if 0 < bh * bw - num <= max_mask_patches:
                    for i in range(top, top + bh):
                        for j in range(left, left + bw):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    count = 0
    while count < num_masked:
        delta = _mask(num_masked - count)
        if delta == 0:
            break
        count += delta
    if count < num_masked:
        free = np.flatnonzero(mask.reshape(-1) == 0)
        mask.reshape(-1)[free[rng.choice(free.size, num_masked - count, replace=False)]] = 1
    return mask.reshape(-1).astype(bool)


@pytest.mark.parametrize("grid,num,min_block,aspect", [
    ((14, 14), 78, 16, 0.3),     # BEiT-3 base: 40 % of 196
    ((16, 16), 102, 16, 0.3),    # the giant's 16 x 16 grid
    ((4, 4), 6, 2, 0.3),         # the demo
    ((4, 4), 4, 4, 0.25),        # blocks of 4 x 1 would fill a column: rejected
])
def test_block_masking_is_beits_generator(grid, num, min_block, aspect):
    for seed in range(200):
        ours = block_image_mask(grid, num, min_block, aspect, np.random.default_rng(seed))
        ref = beit_generator(*grid, num, min_block, aspect, np.random.default_rng(seed))
        assert int(ours.sum()) == num
        assert np.array_equal(ours, ref), seed


def test_blocks_as_wide_as_the_grid_are_rejected():
    """4 patches of a 4 x 4 grid in blocks of >= 4, aspect up to 4: a 4 x 1 block (a whole
    row or column) is BEiT's most likely draw when allowed. Rejected, whole lines come only
    from blocks and single patches meeting by chance."""
    def full_lines(seeds):
        n = 0
        for s in seeds:
            m = block_image_mask((4, 4), 4, 4, 0.25, np.random.default_rng(s)).reshape(4, 4)
            n += bool(m.all(0).any() or m.all(1).any())
        return n / len(seeds)
    assert full_lines(range(400)) < 0.15   # 0.09 here; 0.29 when such blocks were allowed


def test_pair_images_masked_only_when_asked(tiny_pretrain):
    src = None
    for ratio, hidden in (("0.0", 0), ("0.4", 6)):
        cfg = tiny_pretrain(f"data.masking.pair_image_ratio={ratio}")
        src = src or DemoSource.from_config(cfg)
        proc = SampleProcessor(cfg, build_text_tokenizer(cfg))
        rng = np.random.default_rng(0)
        pair, image = proc(src.sample("pair", 0), rng), proc(src.sample("image", 0), rng)
        assert int(pair.image_mask.sum()) == hidden
        assert int(image.image_mask.sum()) == 6      # image-only: image_ratio 0.4 of 16
    assert tiny_pretrain().data.masking.pair_image_ratio == 0.0


def test_bert_mode_is_80_10_10_and_mask_mode_is_all_mask():
    specials, mask_id, vocab = (0, 1, 2, 3), 999, 1000
    ids = np.random.default_rng(1).integers(4, 999, 200_000)
    hidden = np.random.default_rng(2).random(ids.size) < 0.15
    out = TextCorruptor("bert", mask_id, vocab, specials)(ids, hidden, np.random.default_rng(3))
    assert np.array_equal(out[~hidden], ids[~hidden])
    h_in, h_out = ids[hidden], out[hidden]
    as_mask = np.mean(h_out == mask_id)
    unchanged = np.mean(h_out == h_in)
    assert as_mask == pytest.approx(0.8, abs=0.01)
    # 10 % kept, plus the random draws that hit the token itself (1 in 995)
    assert unchanged == pytest.approx(0.1 + 0.1 / 995, abs=0.01)
    random = h_out[(h_out != mask_id) & (h_out != h_in)]
    assert random.size / h_out.size == pytest.approx(0.1, abs=0.01)
    assert not np.isin(random, specials).any() and random.max() < vocab
    out = TextCorruptor("mask", mask_id, vocab, specials)(ids, hidden, np.random.default_rng(3))
    assert np.all(out[hidden] == mask_id) and np.array_equal(out[~hidden], ids[~hidden])


def test_processor_text_modes(tiny_pretrain):
    texts = " ".join(DemoSource(32).sentences(30))
    from megatron_style.data.raw import RawSample
    got = {}
    for mode in ("bert", "mask"):
        cfg = tiny_pretrain(f"data.masking.text_mode={mode}", "model.max_text_len=400")
        tok = build_text_tokenizer(cfg)
        proc = SampleProcessor(cfg, tok)
        s = proc(RawSample("text", None, texts, "x"), np.random.default_rng(0))
        hidden = s.text[s.text_mask]
        assert s.text[0] == tok.bos_id and s.text[-1] == tok.eos_id  # never hidden
        assert not s.text_mask[0] and not s.text_mask[-1]
        got[mode] = float((hidden == tok.mask_id).float().mean())
    assert got["mask"] == 1.0 and 0.6 < got["bert"] < 0.95
