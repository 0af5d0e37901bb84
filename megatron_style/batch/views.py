"""Views of a packed batch for objectives that encode a pair's image and text apart.

The image-text contrastive loss (ITC: BEiT-3's retrieval tuning, VLMo) is a dual encoder: the
image of a pair alone through the vision experts, its text alone through the language experts.
`dual_encoder_views` takes the pairs of a `PackedBatch` and lays them out as two batches of
one kind each, without masking:

    source  [CLS p..][t..]  [CLS p.. t..]  [t..]  [CLS p.. u..]      (image, text, pair, ...)
    images  [CLS p..][CLS p..]                 pair images, image_mask all False
    texts   [t..][u..]                         pair texts, the original ids

so that row i of each view is pair i (in the order the pairs have in the source batch).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_style.batch.types import (KIND_IMAGE, KIND_PAIR, KIND_TEXT, LANGUAGE, VISION,
                                        PackedBatch, Route)
from megatron_style.config import ModelConfig


class DualEncoderViews(NamedTuple):
    images: PackedBatch   # one image-only sample per pair, unmasked
    texts: PackedBatch    # one text-only sample per pair, with its original (unmasked) ids
    pairs: torch.Tensor   # [n] long: the sample index in the source batch of pair i


def _one_way_route(n: int, way: int, num_experts: int, device) -> Route:
    """The Route of a stream whose n tokens all go to expert `way` (what
    Route.from_expert_ids gives, built without its host round trip)."""
    ar = torch.arange(n, device=device)
    counts = tuple(n if e == way else 0 for e in range(num_experts))
    return Route(ar, ar.clone(), counts)


def dual_encoder_views(b: PackedBatch, cfg: ModelConfig) -> DualEncoderViews:
    """The pairs of `b` as an image-only batch and a text-only batch (see the module docstring).

    Invariant (tests/model/test_contrastive.py): each view equals `pack_samples` of the pairs'
    unmasked images (image_mask all False), respectively of their texts with the original ids,
    field for field; the views carry no masked-modeling targets and no tokenizer images.

    Built from the batch's own tensors rather than from the Samples before packing: the
    trainer gets one object per step (the PackedBatch), so the loader and the loss need not
    agree on a second one, and the same PackedBatch can feed MDM and ITC. The hidden text
    ids come back from `text_targets` (the original id of every hidden token, at
    `text_target_pos`). Everything is index arithmetic and runs on any device; the sizes of
    the views (pair count, longest text) are host ints, read from `sample_kind` and
    `cu_seqlens` (a few host syncs on a GPU batch, none on the CPU: the loader may call it
    before moving the batch). Raises ValueError when `b` holds no pair."""
    P1 = cfg.num_patches + 1
    kinds = b.sample_kind.long()
    dev = kinds.device
    pairs = (kinds == KIND_PAIR).nonzero().squeeze(1)
    n = int(pairs.numel())
    if n == 0:
        raise ValueError("the batch holds no image-text pair: there is nothing for a dual "
                         "encoder to contrast (check batch.kind_counts()['pair'] first)")
    cu = b.cu_seqlens.long()

    # Images are stored in the order of the samples that have one (image and pair samples).
    img_rows = (kinds[kinds != KIND_TEXT] == KIND_PAIR).nonzero().squeeze(1)
    images = b.images.index_select(0, img_rows)
    n_img_tok = n * P1
    images_view = PackedBatch(
        images=images,
        image_mask=torch.zeros(n, cfg.num_patches, dtype=torch.bool, device=dev),
        text_ids=b.text_ids.new_zeros(0),
        text_pos=b.text_pos.new_zeros(0),
        token_source=torch.arange(n_img_tok, device=dev),
        token_sample=torch.arange(n, device=dev).repeat_interleave(P1),
        cu_seqlens=(torch.arange(n + 1, device=dev) * P1).to(torch.int32),
        max_seqlen=P1,
        sample_kind=torch.full((n,), int(KIND_IMAGE), dtype=torch.long, device=dev),
        route=_one_way_route(n_img_tok, VISION, 2, dev),
        route_vl=_one_way_route(n_img_tok, VISION, 3, dev),
        **_no_targets(dev),
        sources=_sources(b, pairs),
    )

    # Text rows of the source table follow its image rows; a token's row is token_source.
    image_rows = b.images.shape[0] * P1
    ids = b.text_ids.clone()
    if b.text_targets.numel():
        # Put the original ids back where the text was masked.
        hidden_rows = b.token_source.index_select(0, b.text_target_pos) - image_rows
        ids[hidden_rows] = b.text_targets.to(ids.dtype)
    pair_text = (kinds == KIND_PAIR)[b.token_sample.long()] & (b.token_source >= image_rows)
    rows = b.token_source[pair_text] - image_rows   # stream order = pair order
    lens = cu[pairs + 1] - cu[pairs] - P1
    n_txt_tok = int(rows.numel())
    cu_t = torch.zeros(n + 1, dtype=torch.int32, device=dev)
    cu_t[1:] = torch.cumsum(lens, 0)
    texts_view = PackedBatch(
        images=b.images.new_zeros(0, *b.images.shape[1:]),
        image_mask=torch.zeros(0, cfg.num_patches, dtype=torch.bool, device=dev),
        text_ids=ids.index_select(0, rows),
        text_pos=b.text_pos.index_select(0, rows),
        token_source=torch.arange(n_txt_tok, device=dev),
        token_sample=torch.arange(n, device=dev).repeat_interleave(lens, output_size=n_txt_tok),
        cu_seqlens=cu_t,
        max_seqlen=int(lens.max()),
        sample_kind=torch.full((n,), int(KIND_TEXT), dtype=torch.long, device=dev),
        route=_one_way_route(n_txt_tok, LANGUAGE, 2, dev),
        route_vl=_one_way_route(n_txt_tok, LANGUAGE, 3, dev),
        **_no_targets(dev),
        sources=_sources(b, pairs),
    )
    return DualEncoderViews(images_view, texts_view, pairs)


def _no_targets(dev) -> dict:
    e = torch.zeros(0, dtype=torch.long, device=dev)
    return dict(image_target_pos=e, image_targets=e.clone(), image_target_stream=e.clone(),
                text_target_pos=e.clone(), text_targets=e.clone(), text_target_stream=e.clone())


def _sources(b: PackedBatch, pairs: torch.Tensor) -> list[str]:
    if len(b.sources) != b.num_samples:
        return []
    return [b.sources[i] for i in pairs.tolist()]
