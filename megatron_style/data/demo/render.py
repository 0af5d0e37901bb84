"""Drawing a demo scene with PIL.

Small images are drawn at 4x and reduced with a box filter: edges are anti-aliased (a 9-pixel
circle still looks round at 32 px) while the interior of each shape keeps its exact colour,
which the tests check pixel by pixel.
"""
from __future__ import annotations

from PIL import Image, ImageDraw

from megatron_style.data.demo.scenes import COLORS, Scene, Shape


def supersampling(img_size: int) -> int:
    return 4 if img_size <= 64 else 2 if img_size <= 160 else 1


def render(scene: Scene) -> Image.Image:
    s = supersampling(scene.img_size)
    big = scene.img_size * s
    img = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(img)
    for shape in scene.shapes:
        _draw(draw, shape, s)
    if s > 1:
        img = img.resize((scene.img_size, scene.img_size), Image.Resampling.BOX)
    return img


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, s: int) -> None:
    color = COLORS[shape.color]
    left, top, right, bottom = (v * s for v in shape.box)
    # PIL's boxes include the last pixel; ours exclude it.
    r, b = right - 1, bottom - 1
    cx = (left + r) / 2
    cy = (top + b) / 2
    if shape.shape == "circle":
        draw.ellipse((left, top, r, b), fill=color)
    elif shape.shape == "square":
        draw.rectangle((left, top, r, b), fill=color)
    elif shape.shape == "triangle":
        draw.polygon([(cx, top), (r, b), (left, b)], fill=color)
    elif shape.shape == "diamond":
        draw.polygon([(cx, top), (r, cy), (cx, b), (left, cy)], fill=color)
    else:
        raise ValueError(f"unknown demo shape {shape.shape!r}")
