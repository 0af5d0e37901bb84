"""Image augmentation with PIL, numpy and torch (no torchvision).

The pretraining recipe (BEiT / BEiT v2, which BEiT-3 follows): random-resized-crop (scale
(0.08, 1), ratio (3/4, 4/3)), horizontal flip with p = 0.5, colour jitter as torchvision's
ColorJitter(0.4, 0.4, 0.4) (brightness, contrast, saturation in a random order, each factor
uniform in [1 - s, 1 + s], clamped to [0, 1] after each; no hue, as in BEiT), then
normalisation with mean = std = 0.5 (timm's IMAGENET_INCEPTION constants used by the released
BEiT-3), i.e. pixels in [-1, 1]. The visual tokenizer's view (VQ-KD) is the same crop and flip
resized a second time, with lanczos as BEiT v2's `second_interpolation`, kept in [0, 1] as its
`ToTensor()` leaves it: both views show exactly the same content, as the targets must match
the inputs. Where BEiT jitters the whole image before cropping, the jitter here runs on the two
resized views with the same factors and order (contrast blends towards the model view's mean
grey, for both views): the same result up to contrast's mean being the crop's.

Speed: one `Image.resize(..., box=...)` does crop and resize in a single pass, and a JPEG that
has not been decoded yet is decoded at a reduced scale (`Image.draft`) when the crop is much
larger than the output, which is most of the time for web images.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from megatron_style.data.errors import BadSample

Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels

MEAN = 0.5
STD = 0.5
#: Smallest side accepted, in pixels: anything smaller is a thumbnail or a broken file.
MIN_SIDE = 8


def check_image(img: Image.Image, source: str = "") -> tuple[int, int]:
    """The image's (width, height); BadSample when it is too small to be a real image."""
    w, h = img.size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise BadSample("image_too_small", f"{w}x{h} pixels, need at least {MIN_SIDE}", source)
    return w, h


def random_resized_crop_box(width: int, height: int, scale: Sequence[float],
                            rng: np.random.Generator,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """A crop covering a random fraction in `scale` of the image area with an aspect ratio
    log-uniform in `ratio` (the Inception crop); the whole image when no such crop fits."""
    area = width * height
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return (left, top, left + w, top + h)
    return full_box(width, height)


def full_box(width: int, height: int) -> Box:
    """The largest centred crop with an aspect ratio in [3/4, 4/3] (the whole image for
    ordinary photos); used for evaluation and as the fallback of the random crop."""
    aspect = width / height
    if aspect > 4 / 3:
        w = round(height * 4 / 3)
        return ((width - w) // 2, 0, (width - w) // 2 + w, height)
    if aspect < 3 / 4:
        h = round(width * 4 / 3)
        return (0, (height - h) // 2, width, (height - h) // 2 + h)
    return (0, 0, width, height)


def decode_reduced(img: Image.Image, box: Box, out_size: int) -> tuple[Image.Image, Box]:
    """For a JPEG not decoded yet, decode at 1/2, 1/4 or 1/8 scale when the crop still has at
    least `out_size` pixels per side at that scale; returns the image and the rescaled box."""
    w0, h0 = img.size
    cw, ch = box[2] - box[0], box[3] - box[1]
    want = (math.ceil(w0 * out_size / cw), math.ceil(h0 * out_size / ch))
    if want[0] >= w0 or want[1] >= h0 or getattr(img, "format", None) != "JPEG":
        return img, box
    try:
        applied = img.draft("RGB", want)
    except Exception:  # no reduced decode for this file: to_rgb decodes it whole, or says why not
        return img, box
    if not applied:  # already decoded: draft() does nothing
        return img, box
    sx, sy = img.size[0] / w0, img.size[1] / h0
    return img, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def to_rgb(img: Image.Image, source: str = "") -> Image.Image:
    """Decode (if lazy) and convert to RGB; a truncated or corrupt file raises BadSample."""
    try:
        return _to_rgb(img)
    except Exception as e:  # OSError, SyntaxError, MemoryError, struct.error, ...: the file's fault
        raise BadSample("bad_image", f"cannot decode: {type(e).__name__}: {e}", source) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    img.load()
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels over white, not over whatever colour they happen to store.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def crop_resize(img: Image.Image, box: Box, size: int,
                resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    return img.resize((size, size), resample, box=box)


def to_unit_tensor(img: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [0, 1]."""
    a = np.array(img, dtype=np.uint8)  # a copy: PIL's buffer is read-only
    return torch.from_numpy(a).permute(2, 0, 1).float().div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (mean = std = 0.5)."""
    return x.sub(MEAN).div_(STD)


def color_jitter(views: list[torch.Tensor], strength: float,
                 rng: np.random.Generator) -> list[torch.Tensor]:
    """torchvision's ColorJitter(s, s, s) (hue 0): brightness, contrast and saturation in a
    random order, each a blend with a factor uniform in [max(0, 1-s), 1+s], clamped to [0, 1]
    after each step. The same factors, order and contrast mean for every view (the tokenizer
    must see what the model sees). Views are in [0, 1]."""
    if strength <= 0:
        return views
    order = rng.permutation(3)
    factors = [float(rng.uniform(max(0.0, 1 - strength), 1 + strength)) for _ in range(3)]
    out = list(views)
    for op in order:
        f = factors[op]
        if op == 0:    # brightness: blend with black
            out = [(x * f).clamp_(0.0, 1.0) for x in out]
        elif op == 1:  # contrast: blend with the (model view's) mean grey
            mean = _gray(out[0]).mean()
            out = [((x - mean) * f + mean).clamp_(0.0, 1.0) for x in out]
        else:          # saturation: blend with the pixel's grey
            out = [((x - _gray(x)) * f + _gray(x)).clamp_(0.0, 1.0) for x in out]
    return out


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)


def augment(img: Image.Image, size: int, tokenizer_size: Optional[int], crop_scale: Sequence[float],
            flip: bool, jitter: float, rng: np.random.Generator, source: str = "",
            train: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The model's view ([3, size, size], normalised) and, when `tokenizer_size` is given, the
    tokenizer's view of the same crop ([3, t, t] in [0, 1]). `train=False`: no randomness,
    the centred `full_box` crop."""
    w, h = check_image(img, source)
    box = random_resized_crop_box(w, h, crop_scale, rng) if train else full_box(w, h)
    img, box = decode_reduced(img, box, max(size, tokenizer_size or 0))
    img = to_rgb(img, source)
    do_flip = train and flip and bool(rng.random() < 0.5)
    views = []
    # The tokenizer's view with lanczos: BEiT v2's --second_interpolation (its default).
    for s, resample in ((size, Image.Resampling.BICUBIC),
                        (tokenizer_size, Image.Resampling.LANCZOS)):
        if s is None:
            continue
        try:  # resampling this sample's pixels: what fails here (memory) is the sample's fault
            v = crop_resize(img, box, s, resample)
            if do_flip:
                v = v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            views.append(to_unit_tensor(v))
        except Exception as e:
            raise BadSample("bad_image", f"cannot resize: {type(e).__name__}: {e}",
                            source) from None
    if train:
        views = color_jitter(views, jitter, rng)
    model_view = normalize(views[0])
    return model_view, (views[1] if tokenizer_size is not None else None)
