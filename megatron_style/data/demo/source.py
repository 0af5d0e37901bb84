"""`DemoSource`: the demo data set, addressable by (kind, index).

Every sample is a pure function of (seed, kind, index): a stream can resume at any position
from its index alone, ranks and workers can split a stream by index (index = start + k * step),
and nothing is stored. Indices below `EVAL_START` are for training; the held-out pairs of the
end-of-run evaluation are `eval_sample(i)`, index `EVAL_START + i`, a range training never
reaches (2**40 samples).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np

from megatron_style.data.demo.render import render
from megatron_style.data.demo.scenes import Scene, sample_scene, sample_sentence
from megatron_style.data.raw import KINDS, RawSample

if TYPE_CHECKING:
    from megatron_style.config import PretrainConfig

EVAL_START = 1 << 40
_KIND_KEYS = {k: i for i, k in enumerate(KINDS)}
MIN_IMG_SIZE = 16


class DemoSource:
    def __init__(self, img_size: int, seed: int = 0):
        if img_size < MIN_IMG_SIZE:
            raise ValueError(f"demo images need img_size >= {MIN_IMG_SIZE}, got {img_size}")
        if seed < 0:
            raise ValueError(f"demo seed must be >= 0, got {seed}")
        self.img_size = img_size
        self.seed = seed

    @classmethod
    def from_config(cls, cfg: "PretrainConfig") -> "DemoSource":
        return cls(cfg.model.img_size, cfg.data.seed)

    def _rng(self, kind: str, index: int) -> np.random.Generator:
        if kind not in _KIND_KEYS:
            raise ValueError(f"demo kind {kind!r} is not one of {KINDS}")
        if not 0 <= index < 2 * EVAL_START:
            raise ValueError(f"demo index {index} is outside [0, {2 * EVAL_START})")
        return np.random.default_rng([self.seed, _KIND_KEYS[kind], int(index)])

    def scene(self, kind: str, index: int) -> Scene:
        """The scene behind an image or pair sample (tests and evaluation read it)."""
        if kind == "text":
            raise ValueError("text samples have no scene; use sample('text', index)")
        return sample_scene(self._rng(kind, index), self.img_size)

    def sample(self, kind: str, index: int) -> RawSample:
        source = f"demo/{kind}/{index}"
        if kind == "text":
            return RawSample("text", None, sample_sentence(self._rng(kind, index)), source)
        scene = self.scene(kind, index)
        text = scene.caption if kind == "pair" else None
        return RawSample(kind, render(scene), text, source)

    def eval_scene(self, i: int) -> Scene:
        return self.scene("pair", EVAL_START + self._eval_index(i))

    def eval_sample(self, i: int) -> RawSample:
        return self.sample("pair", EVAL_START + self._eval_index(i))

    @staticmethod
    def _eval_index(i: int) -> int:
        if not 0 <= i < EVAL_START:
            raise ValueError(f"held-out index {i} must be in [0, {EVAL_START})")
        return i

    def stream(self, kind: str, start: int = 0, step: int = 1) -> Iterator[tuple[int, RawSample]]:
        """(index, sample) for index = start, start + step, ...: endless, resumable by index."""
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        index = start
        while index < EVAL_START:
            yield index, self.sample(kind, index)
            index += step

    def sentences(self, n: int, start: int = 0) -> list[str]:
        """n text-only sentences (the corpus the demo's SentencePiece model is trained on)."""
        return [self.sample("text", start + i).text for i in range(n)]
