import io

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_style.data.errors import BadSample
from megatron_style.data.transforms import augment, color_jitter, random_resized_crop_box


def gradient_image(w=320, h=240):
    """Asymmetric content: red rises left to right, green top to bottom."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    a = np.stack([x, y, np.full_like(x, 60)], -1).astype(np.uint8)
    return Image.fromarray(a)


def test_views_shapes_ranges_and_same_crop():
    rng = np.random.default_rng(0)
    img, tok = augment(gradient_image(), 224, 256, [0.3, 1.0], True, 0.0, rng)
    assert img.shape == (3, 224, 224) and img.dtype == torch.float32
    assert tok.shape == (3, 256, 256)
    assert img.min() >= -1 and img.max() <= 1 and img.min() < -0.5   # normalised to [-1, 1]
    assert tok.min() >= 0 and tok.max() <= 1
    # The tokenizer's view is the same crop (and flip) at another resolution.
    down = torch.nn.functional.interpolate(tok[None], size=224, mode="area")[0]
    assert (down - (img * 0.5 + 0.5)).abs().mean() < 0.01


def test_no_tokenizer_view_when_not_needed():
    img, tok = augment(gradient_image(), 32, None, [0.5, 1.0], False, 0.0, np.random.default_rng(0))
    assert img.shape == (3, 32, 32) and tok is None


def test_flip_happens_half_the_time_only_when_enabled():
    flips = 0
    for seed in range(40):
        img, _ = augment(gradient_image(), 64, None, [1.0, 1.0], True, 0.0, np.random.default_rng(seed))
        red = img[0]
        flips += bool(red[:, 0].mean() > red[:, -1].mean())   # red rises to the right unless flipped
    assert 8 <= flips <= 32
    for seed in range(10):
        img, _ = augment(gradient_image(), 64, None, [1.0, 1.0], False, 0.0, np.random.default_rng(seed))
        assert img[0][:, 0].mean() < img[0][:, -1].mean()


def test_eval_mode_is_deterministic_and_whole_image():
    a, _ = augment(gradient_image(), 64, None, [0.2, 0.3], True, 0.5, None, train=False)
    b, _ = augment(gradient_image(), 64, None, [0.2, 0.3], True, 0.5, None, train=False)
    assert torch.equal(a, b)
    assert a[0][:, 0].mean() < -0.9 and a[0][:, -1].mean() > 0.9   # full red range: no crop


def test_crop_box_respects_scale():
    for seed in range(50):
        l, t, r, b = random_resized_crop_box(400, 300, [0.4, 0.6], np.random.default_rng(seed))
        assert 0 <= l < r <= 400 and 0 <= t < b <= 300
        assert 0.35 <= (r - l) * (b - t) / 120000 <= 0.65


def test_color_jitter_same_factors_for_both_views_and_range():
    x = torch.rand(3, 16, 16)
    y = torch.nn.functional.interpolate(x[None], size=32, mode="nearest")[0]
    jx, jy = color_jitter([x, y], 0.4, np.random.default_rng(0))
    assert not torch.allclose(jx, x) and jx.min() >= 0 and jx.max() <= 1
    assert torch.allclose(torch.nn.functional.interpolate(jx[None], size=32, mode="nearest")[0], jy,
                          atol=1e-5)
    assert color_jitter([x], 0.0, np.random.default_rng(0))[0] is x


def test_lazy_jpeg_reduced_decode_matches_full_decode():
    buf = io.BytesIO()
    gradient_image(1600, 1200).save(buf, "JPEG", quality=95)
    lazy = Image.open(io.BytesIO(buf.getvalue()))
    full = Image.open(io.BytesIO(buf.getvalue()))
    full.load()
    a, _ = augment(lazy, 224, None, [0.5, 1.0], False, 0.0, np.random.default_rng(1))
    b, _ = augment(full, 224, None, [0.5, 1.0], False, 0.0, np.random.default_rng(1))
    assert lazy.size[0] < 1600          # decoded at reduced scale
    assert (a - b).abs().mean() < 0.02  # same crop, same picture


def test_modes_converted_and_bad_images_rejected():
    for mode in ("L", "RGBA", "P", "CMYK"):
        im = gradient_image(40, 40).convert(mode)
        x, _ = augment(im, 32, None, [0.5, 1.0], True, 0.0, np.random.default_rng(0))
        assert x.shape == (3, 32, 32)
    with pytest.raises(BadSample) as e:
        augment(Image.new("RGB", (4, 100)), 32, None, [0.5, 1.0], True, 0.0, np.random.default_rng(0))
    assert e.value.reason == "image_too_small"
    buf = io.BytesIO()
    gradient_image().save(buf, "JPEG")
    truncated = Image.open(io.BytesIO(buf.getvalue()[:len(buf.getvalue()) // 2]))
    with pytest.raises(BadSample) as e:
        augment(truncated, 32, None, [0.5, 1.0], True, 0.0, np.random.default_rng(0))
    assert e.value.reason == "bad_image"
