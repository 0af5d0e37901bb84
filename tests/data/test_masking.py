import numpy as np
import pytest

from megatron_style.data.errors import BadSample
from megatron_style.data.masking import ImageMasker, block_image_mask, num_image_masked, text_mask


def components(mask2d):
    """Sizes of the 4-connected groups of hidden patches."""
    seen = np.zeros_like(mask2d)
    sizes = []
    h, w = mask2d.shape
    for y in range(h):
        for x in range(w):
            if mask2d[y, x] and not seen[y, x]:
                stack, n = [(y, x)], 0
                seen[y, x] = True
                while stack:
                    cy, cx = stack.pop()
                    n += 1
                    for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                        if 0 <= ny < h and 0 <= nx < w and mask2d[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
                sizes.append(n)
    return sizes


def test_block_mask_exact_count_and_blocky_at_paper_settings():
    masker = ImageMasker(grid=14, ratio=0.4, min_block=16, min_aspect=0.3)
    assert masker.num_masked == 78
    n_groups = []
    for seed in range(50):
        m = masker(np.random.default_rng(seed))
        assert m.shape == (196,) and m.dtype == bool and int(m.sum()) == 78
        n_groups.append(len(components(m.reshape(14, 14))))
    # Random masking of 78/196 patches gives ~25 groups; blocks give a handful.
    assert np.mean(n_groups) < 8
    rnd = np.zeros(196, bool)
    rnd[np.random.default_rng(0).choice(196, 78, replace=False)] = True
    assert len(components(rnd.reshape(14, 14))) > 2 * np.mean(n_groups)


def test_block_mask_tiny_grid_clamps_min_block():
    # 4x4 grid, 40% -> 6 patches; the 16-patch minimum block cannot fit and is clamped.
    masker = ImageMasker(grid=4, ratio=0.4, min_block=16, min_aspect=0.3)
    largest = []
    for seed in range(100):
        m = masker(np.random.default_rng(seed))
        assert int(m.sum()) == 6
        largest.append(max(components(m.reshape(4, 4))))
    assert np.mean(largest) >= 3.5   # mostly contiguous, not 6 scattered patches


def test_block_mask_deterministic_given_rng():
    a = block_image_mask(14, 78, 16, 0.3, np.random.default_rng(7))
    b = block_image_mask(14, 78, 16, 0.3, np.random.default_rng(7))
    c = block_image_mask(14, 78, 16, 0.3, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_block_mask_rectangular_grid_and_bad_args():
    m = block_image_mask((3, 9), 10, 4, 0.5, np.random.default_rng(0))
    assert m.shape == (27,) and m.sum() == 10
    with pytest.raises(ValueError, match="num_masked"):
        block_image_mask(4, 17, 4, 0.3, np.random.default_rng(0))
    assert num_image_masked(16, 0.99) == 15 and num_image_masked(16, 0.01) == 1


def test_text_mask_ratio_specials_and_determinism():
    specials = (0, 1, 2)
    ids = [0] + list(range(10, 210)) + [2]
    for ratio in (0.15, 0.5):
        for seed in range(20):
            m = text_mask(ids, specials, ratio, np.random.default_rng(seed))
            assert not m[0] and not m[-1]
            assert abs(int(m.sum()) - ratio * 200) < 1
    short = [0, 55, 2]   # one ordinary token: always that one
    assert text_mask(short, specials, 0.15, np.random.default_rng(0)).tolist() == [False, True, False]
    a = text_mask(ids, specials, 0.15, np.random.default_rng(3))
    assert np.array_equal(a, text_mask(ids, specials, 0.15, np.random.default_rng(3)))
    with_pad = [0, 40, 41, 2, 1, 1]
    for seed in range(20):
        m = text_mask(with_pad, specials, 0.5, np.random.default_rng(seed))
        assert not m[[0, 3, 4, 5]].any() and m.sum() >= 1


def test_text_mask_only_specials_is_bad_sample():
    with pytest.raises(BadSample) as e:
        text_mask([0, 2], (0, 1, 2), 0.15, np.random.default_rng(0), source="x.tar/1")
    assert e.value.reason == "empty_text" and "x.tar/1" in str(e.value)
