"""Scenes of the demo data: one or two coloured shapes on a plain grey background, and the
sentences that describe them.

The design serves the end-of-run check that the model reads the image: in a caption, the
colour, shape and size of each object and the relation between two objects are drawn uniformly
and independently, so the text alone predicts them no better than chance (1/6, 1/4, 1/2, 1/4),
while the image determines them. Text-only sentences come from the same grammar (plus two extra
templates) and teach it; their content words are equally random.

Geometry, in pixels of an image of side S: a small shape is ~0.28 S wide, a large one ~0.47 S
(9 and 15 px at the tiny preset's 32 px, so two large shapes still fit side by side). Two shapes
never overlap, and "A left of B" means A's box ends left of where B's box starts (likewise
"above"), so every relation word is exactly true of the drawn image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Bumped whenever what a (kind, index, seed) produces changes: it keys the cached tokenizers.
GENERATOR_VERSION = 2

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 230),
    "yellow": (240, 215, 40),
    "purple": (155, 55, 205),
    "orange": (250, 140, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, float] = {"small": 0.28, "large": 0.47}
# relation word(s) -> axis (0 = x, 1 = y) and whether the first-named shape comes first on it
RELATIONS: dict[str, tuple[int, bool]] = {
    "left of": (0, True), "right of": (0, False), "above": (1, True), "below": (1, False)}
# One shape binds every content word to the only object, which a tiny model learns within a
# few hundred steps; two shapes add relations and the binding of words to objects.
SINGLE_SHAPE_FRACTION = 0.6
BACKGROUND_GREY = (95, 165)   # background grey level range: never mistaken for a shape colour

# Word roles in a caption: what the evaluation masks.
ROLE_SIZE, ROLE_COLOR, ROLE_SHAPE, ROLE_RELATION = "size", "color", "shape", "relation"
CONTENT_ROLES = (ROLE_SIZE, ROLE_COLOR, ROLE_SHAPE, ROLE_RELATION)


@dataclass
class Shape:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]   # left, top, right (exclusive), bottom (exclusive)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    def words(self) -> list[tuple[str, str]]:
        return [("a", ""), (self.size, ROLE_SIZE), (self.color, ROLE_COLOR), (self.shape, ROLE_SHAPE)]


@dataclass
class Scene:
    img_size: int
    background: tuple[int, int, int]
    shapes: list[Shape]
    relation: str = ""                     # between shapes[0] and shapes[1], as worded
    # (word, role) of the caption in order; role "" for function words
    words: list[tuple[str, str]] = field(default_factory=list)

    @property
    def caption(self) -> str:
        return " ".join(w for w, _ in self.words)

    def content(self) -> list[tuple[str, str]]:
        """The content words with their roles, in caption order."""
        return [(w, r) for w, r in self.words if r]


def shape_side(img_size: int, size: str) -> int:
    # Two large shapes plus a one-pixel gap must fit across the image at any size.
    return max(3, min(round(SIZES[size] * img_size), (img_size - 1) // 2))


def sample_scene(rng: np.random.Generator, img_size: int) -> Scene:
    """A random scene: one shape (SINGLE_SHAPE_FRACTION) or two in a random relation."""
    grey = int(rng.integers(BACKGROUND_GREY[0], BACKGROUND_GREY[1] + 1))
    scene = Scene(img_size, (grey, grey, grey), [])
    kinds = [_attributes(rng) for _ in range(1 if rng.random() < SINGLE_SHAPE_FRACTION else 2)]
    if len(kinds) == 1:
        shape, color, size = kinds[0]
        side = shape_side(img_size, size)
        x, y = (int(v) for v in rng.integers(0, img_size - side + 1, size=2))
        scene.shapes.append(Shape(shape, color, size, (x, y, x + side, y + side)))
        scene.words = scene.shapes[0].words()
        return scene
    relation = list(RELATIONS)[int(rng.integers(len(RELATIONS)))]
    axis, first_before = RELATIONS[relation]
    sides = [shape_side(img_size, k[2]) for k in kinds]
    # Along the relation's axis the two boxes are disjoint with a gap of at least one pixel;
    # across it each shape is anywhere.
    gap = 1
    slack = img_size - sides[0] - sides[1] - gap
    lead = 0 if first_before else 1          # which shape comes first along the axis
    trail = 1 - lead
    start_lead = int(rng.integers(0, slack + 1))
    start_trail = int(rng.integers(start_lead + sides[lead] + gap, img_size - sides[trail] + 1))
    starts = {lead: start_lead, trail: start_trail}
    for i, (shape, color, size) in enumerate(kinds):
        along = starts[i]
        across = int(rng.integers(0, img_size - sides[i] + 1))
        x, y = (along, across) if axis == 0 else (across, along)
        scene.shapes.append(Shape(shape, color, size, (x, y, x + sides[i], y + sides[i])))
    scene.relation = relation
    rel_words = relation.split()
    scene.words = (scene.shapes[0].words() + [(rel_words[0], ROLE_RELATION)]
                   + [(w, "") for w in rel_words[1:]] + scene.shapes[1].words())
    return scene


def _attributes(rng: np.random.Generator) -> tuple[str, str, str]:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    return shape, color, size


def sample_sentence(rng: np.random.Generator) -> str:
    """A text-only sentence: a scene's caption (80%), or the same content in one of two other
    templates, so the language stream is a little richer than the captions."""
    scene = sample_scene(rng, 64)
    r = rng.random()
    if r < 0.8 or (len(scene.shapes) == 1 and r < 0.9):
        return scene.caption
    phrases = [" ".join(w for w, _ in s.words()) for s in scene.shapes]
    if len(phrases) == 1:
        return f"there is {phrases[0]}"
    return f"there is {phrases[0]} and {phrases[1]}"
