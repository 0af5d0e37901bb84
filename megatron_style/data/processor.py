"""RawSample -> masked model Sample: augment the image, tokenize the text, mask both.

    image: random-resized-crop (data.crop_scale) -> flip (if the stream's `flip`) -> colour
           jitter (data.color_jitter) -> [3, S, S] in [-1, 1], plus the same crop in [0, 1] at
           the visual tokenizer's resolution (VQ-KD: its own view, lanczos) -> block mask of
           the patches (image-only: data.masking.image_ratio; pairs: pair_image_ratio)
    text:  SentencePiece -> <s> ids </s>, at most model.max_text_len -> mask 15% (text-only) or
           50% (pairs) of the ids, which become <mask> or, in BERT's mode, 80/10/10

`image_targets` stay None: the visual tokenizer runs on the training device and the trainer
fills them with `PackedBatch.with_image_targets`. All randomness comes from the `rng` argument,
so a loader that seeds it per sample makes the whole pipeline reproducible. Unusable samples
raise `BadSample` (errors.py), which the loader counts and skips: any error while decoding or
resizing an image or tokenizing a text is that sample's (MemoryError included); an error
anywhere else (masking, packing) is a bug and propagates.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from megatron_style.config import PretrainConfig
from megatron_style.data.errors import BadSample
from megatron_style.data.masking import ImageMasker, TextCorruptor, text_mask
from megatron_style.data.raw import RawSample
from megatron_style.data.text_tokenizer import TextTokenizer, check_vocab
from megatron_style.data.transforms import augment
from megatron_style.data.visual_tokenizers import tokenizer_input_size
from megatron_style.batch import Sample


class SampleProcessor:
    def __init__(self, cfg: PretrainConfig, text_tokenizer: TextTokenizer):
        check_vocab(text_tokenizer, cfg.model.text_vocab_size)
        self.cfg = cfg
        self.tok = text_tokenizer
        mk = cfg.data.masking
        self.image_maskers = {
            kind: ImageMasker(cfg.model.grid, ratio, mk.image_min_block, mk.image_min_aspect)
            for kind, ratio in (("image", mk.image_ratio), ("pair", mk.pair_image_ratio))}
        self.corrupt = TextCorruptor(mk.text_mode, text_tokenizer.mask_id,
                                     text_tokenizer.vocab_size, text_tokenizer.special_ids)
        self.tokenizer_size = tokenizer_input_size(cfg)
        self.flip = {k: cfg.data.flips(k) for k in ("image", "pair")}
        self.text_ratio = {"text": mk.text_ratio, "pair": mk.pair_text_ratio}

    def __call__(self, raw: RawSample, rng: np.random.Generator, train: bool = True) -> Sample:
        """One masked sample; `train=False` (validation): the evaluation view of the image
        (whole, unflipped, no jitter), masks and text corruption still drawn from `rng`."""
        s = Sample(source=raw.source)
        if raw.kind in ("image", "pair"):
            s.image, s.tokenizer_image = self.image_views(raw.image, rng if train else None,
                                                          raw.kind, raw.source, train=train)
            s.image_mask = torch.from_numpy(self.image_maskers[raw.kind](rng))
        if raw.kind in ("text", "pair"):
            ids = self.text_ids(raw.text, raw.source)
            mask = text_mask(ids, self.tok.special_ids, self.text_ratio[raw.kind], rng, raw.source)
            s.text_targets = torch.tensor(ids, dtype=torch.long)
            s.text_mask = torch.from_numpy(mask)
            s.text = torch.from_numpy(self.corrupt(np.asarray(ids), mask, rng))
        return s

    def image_views(self, image, rng: Optional[np.random.Generator], kind: str = "image",
                    source: str = "", train: bool = True
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The model's view and (if needed) the tokenizer's view of an image. `train=False`
        (evaluation): the full image, no randomness."""
        if image is None:
            raise BadSample("missing_image", "", source)
        d = self.cfg.data
        return augment(image, self.cfg.model.img_size, self.tokenizer_size, d.crop_scale,
                       self.flip.get(kind, False), d.color_jitter, rng, source, train=train)

    def text_ids(self, text, source: str = "") -> list[int]:
        if text is None:
            raise BadSample("missing_text", "", source)
        return self.tok.encode_for_model(text, self.cfg.model.max_text_len, source)
