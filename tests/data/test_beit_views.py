"""The image views as BEiT / BEiT v2 prepare them: colour jitter as torchvision's
ColorJitter(0.4, 0.4, 0.4) (random order, clamped after each op, the same for both views), the
VQ-KD view resized with lanczos (BEiT v2's second_interpolation) and given to VQ-KD even at the
model's resolution, and VQ-KD's position table resized with scale_factor (g + 0.1) / g0."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from megatron_style.data.transforms import augment, color_jitter, full_box, to_unit_tensor
from megatron_style.data.visual_tokenizers import tokenizer_input_size
from megatron_style.data.visual_tokenizers.vqkd import resize_pos_embed


def _gray(x):
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)


def torchvision_jitter(x, order, factors):
    """torchvision's ColorJitter on a [0, 1] tensor: each op blends and clamps
    (_blend(img1, img2, r) = (r img1 + (1 - r) img2).clamp(0, 1)), in `order`."""
    def blend(a, b, r):
        return (r * a + (1 - r) * b).clamp(0, 1)
    for op in order:
        if op == 0:
            x = blend(x, torch.zeros_like(x), factors[0])
        elif op == 1:
            x = blend(x, _gray(x).mean(), factors[1])
        else:
            x = blend(x, _gray(x), factors[2])
    return x


def test_jitter_is_torchvisions_colorjitter_in_a_random_order():
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    orders = set()
    for seed in range(12):
        rng = np.random.default_rng(seed)
        order = rng.permutation(3)
        factors = [float(rng.uniform(0.6, 1.4)) for _ in range(3)]
        orders.add(tuple(order))
        a, b = color_jitter([x.clone(), x.clone()], 0.4, np.random.default_rng(seed))
        assert torch.equal(a, b)                       # the tokenizer sees what the model sees
        assert torch.allclose(a, torchvision_jitter(x, order, factors), atol=1e-6), seed
    assert len(orders) > 2                             # not one fixed order


def test_tokenizer_view_is_lanczos_of_the_same_crop():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    model_view, tok_view = augment(img, 32, 64, (0.08, 1.0), True, 0.4, None, train=False)
    box = full_box(*img.size)
    want = to_unit_tensor(img.resize((64, 64), Image.Resampling.LANCZOS, box=box))
    assert torch.equal(tok_view, want)
    bicubic = to_unit_tensor(img.resize((32, 32), Image.Resampling.BICUBIC, box=box))
    assert torch.allclose(model_view, bicubic * 2 - 1)


def test_vqkd_reads_its_own_view_at_the_models_resolution(tiny_pretrain):
    # patch 16 at 32 px: a 2 x 2 grid, VQ-KD's 2 x 16 px is the model's size, still its own view
    cfg = tiny_pretrain("model.patch_size=16", "data.tokenizer.visual=vqkd",
                        "data.tokenizer.visual_model=/x.pth")
    assert tokenizer_input_size(cfg) == 32
    giant_like = tiny_pretrain("model.patch_size=14", "model.img_size=56",
                               "data.tokenizer.visual=vqkd", "data.tokenizer.visual_model=/x.pth")
    assert tokenizer_input_size(giant_like) == 64     # 4 x 4 grid -> 4 x 16 px


def test_vqkd_position_table_resized_as_beit_v2():
    g0, g, D = 14, 16, 8
    pos = torch.randn(1, 1 + g0 * g0, D, generator=torch.Generator().manual_seed(0))
    out = resize_pos_embed(pos, g)
    assert out.shape == (1, 1 + g * g, D) and torch.equal(out[:, :1], pos[:, :1])
    img = pos[:, 1:].reshape(1, g0, g0, D).permute(0, 3, 1, 2)
    w0 = g + 0.1
    ref = F.interpolate(img, scale_factor=(w0 / math.sqrt(g0 * g0), w0 / math.sqrt(g0 * g0)),
                        mode="bicubic")
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, g * g, D), atol=1e-6)
    by_size = F.interpolate(img, size=(g, g), mode="bicubic", align_corners=False)
    assert not torch.allclose(out[:, 1:], by_size.permute(0, 2, 3, 1).reshape(1, g * g, D),
                              atol=1e-3)
