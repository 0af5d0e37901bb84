"""Fusion batches for image-text matching (ITM): chosen images and texts of the dual-encoder
views, put back together as pair samples.

    images  [CLS p..][CLS q..][CLS r..]          image-only view (rows 0, 1, 2)
    texts   [t..][u..][v..]                      text-only view  (rows 0, 1, 2)
    fusion_pairs(images, texts, [0, 0, 2], [0, 2, 0])
            [CLS p.. t..][CLS p.. v..][CLS r.. t..]

A pair sample routes every token to the vision-language expert in the top `vl_layers` layers
(pack.py), so a fusion batch is the input of the fusion encoder as it is. The negatives of ITM
come from any rank of the data-parallel group, so `gather_views` first brings every rank's
views together (inputs only: no gradient flows back through a gathered image or text id).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_style.batch.types import (KIND_IMAGE, KIND_PAIR, KIND_TEXT, LANGUAGE,
                                        POSITION_OFFSET, VISION, VL, PackedBatch, Route)
from megatron_style.batch.views import _no_targets, _one_way_route
from megatron_style.config import ModelConfig


def _check_views(images: PackedBatch, texts: PackedBatch) -> None:
    # Shape checks only (host ints): the value checks would stall a GPU batch.
    if images.text_ids.shape[0] != 0 or images.images.shape[0] != images.num_samples:
        raise ValueError(f"`images` must be an image-only batch (one image per sample, no text); "
                         f"got {images.images.shape[0]} images and {images.text_ids.shape[0]} "
                         f"text tokens in {images.num_samples} samples")
    if texts.images.shape[0] != 0 or texts.text_ids.shape[0] != texts.num_tokens:
        raise ValueError(f"`texts` must be a text-only batch; got {texts.images.shape[0]} images "
                         f"and {texts.text_ids.shape[0]} text tokens in a {texts.num_tokens}-token "
                         "stream")


def _text_lengths(texts: PackedBatch) -> torch.Tensor:
    cu = texts.cu_seqlens.long()
    return cu[1:] - cu[:-1]


def _within(lens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For `total` = lens.sum() tokens laid out sample after sample: (sample of each token,
    its index inside the sample, each sample's start)."""
    dev = lens.device
    starts = torch.cumsum(lens, 0) - lens
    sample = torch.arange(lens.shape[0], device=dev).repeat_interleave(lens, output_size=total)
    return sample, torch.arange(total, device=dev) - starts[sample], starts


def fusion_pairs(images: PackedBatch, texts: PackedBatch, image_index: torch.Tensor,
                 text_index: torch.Tensor, cfg: ModelConfig) -> PackedBatch:
    """m pair samples: sample k is image `image_index[k]` of `images` with text
    `text_index[k]` of `texts` (indices may repeat), unmasked, without masked-modeling targets.

    `images` is an image-only batch and `texts` a text-only batch, as dual_encoder_views returns
    them (or gather_views). Invariant (tests/model/test_matching.py): the result equals
    `pack_samples([Sample(image=..., image_mask=zeros, text=ids, source=...) ...], cfg)` field for
    field, routes included; `sources` are "<image source>+<text source>" when both views carry
    theirs, else []. Everything is index arithmetic on the views' device; the total text length
    and the longest sample are read on the host (one sync on a GPU batch)."""
    _check_views(images, texts)
    ii, ti = image_index.long().reshape(-1), text_index.long().reshape(-1)
    m = int(ii.shape[0])
    if m == 0 or ti.shape[0] != m:
        raise ValueError(f"fusion_pairs needs as many image indices as text indices, at least "
                         f"one; got {m} and {ti.shape[0]}")
    dev = images.images.device
    ii, ti = ii.to(dev), ti.to(dev)
    P = cfg.num_patches
    P1 = P + 1
    if images.image_mask.shape[1] != P:
        raise ValueError(f"the image view has {images.image_mask.shape[1]} patches per image; "
                         f"the model takes {P}")

    # Text tokens of the chosen texts, sample after sample: their positions in the text view.
    t_lens = _text_lengths(texts).to(dev)
    t_starts = texts.cu_seqlens.long().to(dev)[:-1]
    lens = t_lens[ti]                                # [m] text length of each fusion sample
    host = torch.stack([lens.sum(), lens.max()]).tolist()   # the one host read
    n_txt, longest = int(host[0]), int(host[1])
    t_sample, t_within, t_off = _within(lens, n_txt)
    view_pos = t_starts[ti][t_sample] + t_within     # stream positions in the text view
    # A text-only stream's token_source rows are its text rows (no image rows before them).
    text_ids = texts.text_ids.index_select(0, texts.token_source.to(dev).index_select(0, view_pos))

    # The stream: sample k = [its P1 image tokens][its text tokens]. Rows of the token table
    # (pack.py's token_source) are all image tokens in sample order, then all text tokens.
    T = m * P1 + n_txt
    sample_lens = lens + P1
    token_sample, within, starts = _within(sample_lens, T)
    is_img = within < P1
    token_source = torch.where(is_img, token_sample * P1 + within,
                               m * P1 + t_off[token_sample] + within - P1)
    cu = torch.zeros(m + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(sample_lens, 0)

    # By modality, a stable sort puts the image tokens first, in stream order, then the text
    # tokens, in stream order: exactly the token table's row order, so the position of a token
    # in sorted order is its token_source, and perm is its inverse.
    inv = token_source.clone()
    perm = torch.empty_like(inv)
    perm[inv] = torch.arange(T, device=dev)
    route = Route(perm, inv, (m * P1, n_txt))

    if len(images.sources) == images.num_samples and len(texts.sources) == texts.num_samples:
        sources = [f"{images.sources[a]}+{texts.sources[b]}"
                   for a, b in zip(ii.tolist(), ti.tolist())]
    else:
        sources = []
    return PackedBatch(
        images=images.images.index_select(0, ii),
        image_mask=torch.zeros(m, P, dtype=torch.bool, device=dev),
        text_ids=text_ids.long(),
        text_pos=POSITION_OFFSET + t_within,
        token_source=token_source,
        token_sample=token_sample,
        cu_seqlens=cu,
        max_seqlen=P1 + longest,
        sample_kind=torch.full((m,), int(KIND_PAIR), dtype=torch.long, device=dev),
        route=route,
        # Every token of a pair goes to the vision-language expert in the VL layers.
        route_vl=_one_way_route(T, VL, 3, dev),
        **_no_targets(dev),
        sources=sources,
    )


# ---- gathering over the data-parallel group ------------------------------------------------
def _image_view(images: torch.Tensor, P: int, sources: list[str]) -> PackedBatch:
    """An image-only batch of `images`, unmasked (what dual_encoder_views' image view is)."""
    n, dev = images.shape[0], images.device
    P1 = P + 1
    return PackedBatch(
        images=images,
        image_mask=torch.zeros(n, P, dtype=torch.bool, device=dev),
        text_ids=torch.zeros(0, dtype=torch.long, device=dev),
        text_pos=torch.zeros(0, dtype=torch.long, device=dev),
        token_source=torch.arange(n * P1, device=dev),
        token_sample=torch.arange(n, device=dev).repeat_interleave(P1),
        cu_seqlens=(torch.arange(n + 1, device=dev) * P1).to(torch.int32),
        max_seqlen=P1,
        sample_kind=torch.full((n,), int(KIND_IMAGE), dtype=torch.long, device=dev),
        route=_one_way_route(n * P1, VISION, 2, dev),
        route_vl=_one_way_route(n * P1, VISION, 3, dev),
        **_no_targets(dev),
        sources=sources,
    )


def _text_view(ids: torch.Tensor, lens: torch.Tensor, like: PackedBatch,
               sources: list[str]) -> PackedBatch:
    """A text-only batch of texts laid end to end (`ids`, with `lens` tokens each)."""
    n, T, dev = lens.shape[0], ids.shape[0], ids.device
    sample, within, _ = _within(lens, T)
    cu = torch.zeros(n + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(lens, 0)
    return PackedBatch(
        images=like.images.new_zeros(0, *like.images.shape[1:]),
        image_mask=like.image_mask.new_zeros(0, like.image_mask.shape[1]),
        text_ids=ids,
        text_pos=POSITION_OFFSET + within,
        token_source=torch.arange(T, device=dev),
        token_sample=sample,
        cu_seqlens=cu,
        max_seqlen=int(lens.max()) if n else 0,
        sample_kind=torch.full((n,), int(KIND_TEXT), dtype=torch.long, device=dev),
        route=_one_way_route(T, LANGUAGE, 2, dev),
        route_vl=_one_way_route(T, LANGUAGE, 3, dev),
        **_no_targets(dev),
        sources=sources,
    )


def _all_gather_padded(x: torch.Tensor, rows: int, group) -> list[torch.Tensor]:
    """Every rank's `x` padded to `rows` rows (all_gather needs one shape on every rank)."""
    padded = x.new_zeros(rows, *x.shape[1:])
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return parts


@torch.no_grad()
def concat_views(views: Sequence[tuple[PackedBatch, PackedBatch]]) -> tuple[PackedBatch, PackedBatch]:
    """Several micro-batches' (image view, text view) as one pair of views, in order: row r of
    micro-batch k is row sum(n_0 .. n_{k-1}) + r of the result (a step's pairs, for ITM over
    the step). No gradient (the views are inputs); no `sources`, as gather_views."""
    if not views:
        raise ValueError("no views to concatenate")
    for images, texts in views:
        _check_views(images, texts)
        if images.num_samples != texts.num_samples:
            raise ValueError(f"{images.num_samples} images but {texts.num_samples} texts: the "
                             "views must hold one image and one text per pair")
    first_images, first_texts = views[0]
    all_images = torch.cat([im.images for im, _ in views])
    ids = torch.cat([tx.text_ids.long().index_select(0, tx.token_source.to(tx.text_ids.device))
                     for _, tx in views])   # stream order
    lens = torch.cat([_text_lengths(tx) for _, tx in views])
    return (_image_view(all_images, first_images.image_mask.shape[1], []),
            _text_view(ids, lens, first_texts, []))


def gather_views(images: PackedBatch, texts: PackedBatch,
                 group: Optional[dist.ProcessGroup]) -> tuple[PackedBatch, PackedBatch]:
    """Every rank's image view and text view (dual_encoder_views), concatenated in rank order:
    row r of rank k's view is row sum(n_0 .. n_{k-1}) + r of the result. Ranks may hold
    different pair counts (0 included) and text lengths. No gradient (the views are inputs).
    `group` None or of size 1: the inputs, unchanged.

    Three collectives, on padded tensors so that gloo can run them too: the sizes (pairs, text
    tokens), then the images, then the text ids with the text lengths (one long tensor), and
    one host sync for the sizes. The gathered views carry no `sources` (strings would need an
    object collective per step; fusion batches built from them have none either). Every rank
    of `group` must call this the same number of times."""
    _check_views(images, texts)
    if images.num_samples != texts.num_samples:
        raise ValueError(f"{images.num_samples} images but {texts.num_samples} texts: the views "
                         "must hold one image and one text per pair")
    if group is None or dist.get_world_size(group) == 1:
        return images, texts
    dev = images.images.device
    n, n_tok = images.num_samples, texts.text_ids.shape[0]
    size = torch.tensor([n, n_tok], dtype=torch.long, device=dev)
    sizes = torch.stack(_all_gather_padded(size[None], 1, group)).reshape(-1, 2).tolist()
    counts, tokens = [s[0] for s in sizes], [s[1] for s in sizes]
    max_n, max_tok = max(counts), max(tokens)
    if sum(counts) == 0:
        raise ValueError("no rank of the group holds a pair: there are no views to gather")

    imgs = _all_gather_padded(images.images, max_n, group)
    lens = _text_lengths(texts).to(dev)
    ids = texts.text_ids.long().index_select(0, texts.token_source.to(dev))   # stream order
    ints = torch.cat([ids, ids.new_zeros(max_tok - n_tok), lens, lens.new_zeros(max_n - n)])
    ints = _all_gather_padded(ints, max_tok + max_n, group)
    all_images = torch.cat([p[:c] for p, c in zip(imgs, counts)])
    all_ids = torch.cat([p[:t] for p, t in zip(ints, tokens)])
    all_lens = torch.cat([p[max_tok:max_tok + c] for p, c in zip(ints, counts)])
    return (_image_view(all_images, images.image_mask.shape[1], []),
            _text_view(all_ids, all_lens, texts, []))
