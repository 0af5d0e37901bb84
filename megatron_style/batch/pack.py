"""Packing: samples laid end to end, with everything the forward pass needs derived on the CPU
(positions, expert routes, target positions); see types.py for the layout."""
from __future__ import annotations

from typing import Sequence

import torch

from megatron_style.batch.types import (KIND_PAIR, LANGUAGE, POSITION_OFFSET, S_IMAGE,
                                        S_PAIR_IMAGE, S_PAIR_TEXT, S_TEXT, VISION, VL,
                                        PackedBatch, Route, Sample)
from megatron_style.config import ModelConfig


def pack_samples(samples: Sequence[Sample], cfg: ModelConfig) -> PackedBatch:
    """Lay samples end to end and derive everything the forward pass needs."""
    if len(samples) == 0:
        raise ValueError("empty batch: pack_samples needs at least one sample")
    P = cfg.num_patches
    n_img_tok = P + 1
    images, image_masks = [], []
    text_ids, text_pos, text_src = [], [], []
    token_source, token_sample, token_mod, token_pair = [], [], [], []
    kinds, lens = [], []
    img_tpos, img_tstream, img_tlist = [], [], []
    txt_tpos, txt_tstream, txt_tlist = [], [], []
    n_text_total = 0
    offset = 0
    tok_images: list[torch.Tensor] = []
    pending = False
    image_targets_are_pixels = None
    # Text rows are appended after all image rows in the source table; their base is known
    # only at the end, so record text rows relative and shift them afterwards.
    for s_idx, s in enumerate(samples):
        kind = s.kind
        kinds.append(kind)
        start = offset
        is_pair = kind == KIND_PAIR
        if s.image is not None:
            j = len(images)
            images.append(s.image)
            mask = s.image_mask if s.image_mask is not None else torch.zeros(P, dtype=torch.bool)
            if mask.shape != (P,):
                raise ValueError(f"sample {s_idx}: image_mask has shape {tuple(mask.shape)}, "
                                 f"expected ({P},) for {cfg.img_size}px images with patch "
                                 f"{cfg.patch_size}")
            image_masks.append(mask.bool())
            token_source.append(torch.arange(j * n_img_tok, (j + 1) * n_img_tok))
            token_mod.append(torch.full((n_img_tok,), VISION))
            hidden = mask.nonzero().squeeze(1)
            if s.tokenizer_image is not None:
                tok_images.append(s.tokenizer_image)
            if hidden.numel():
                if s.image_targets is None:
                    pending = True
                else:
                    pix = s.image_targets.dtype.is_floating_point
                    if image_targets_are_pixels is None:
                        image_targets_are_pixels = pix
                    elif image_targets_are_pixels != pix:
                        raise ValueError("a batch mixes visual-token and pixel targets")
                    img_tlist.append(s.image_targets[hidden])
                img_tpos.append(start + 1 + hidden)
                img_tstream.append(torch.full((hidden.numel(),),
                                              S_PAIR_IMAGE if is_pair else S_IMAGE))
            offset += n_img_tok
        if s.text is not None:
            L = int(s.text.shape[0])
            if L == 0:
                raise ValueError(f"sample {s_idx}: empty text")
            text_ids.append(s.text.long())
            text_pos.append(torch.arange(POSITION_OFFSET, POSITION_OFFSET + L))
            text_src.append(torch.arange(n_text_total, n_text_total + L))
            token_source.append(-1 - torch.arange(n_text_total, n_text_total + L))  # fixed below
            token_mod.append(torch.full((L,), LANGUAGE))
            if s.text_mask is not None and bool(s.text_mask.any()):
                if s.text_targets is None:
                    raise ValueError(f"sample {s_idx}: text has hidden tokens but no text_targets")
                hidden = s.text_mask.nonzero().squeeze(1)
                txt_tlist.append(s.text_targets.long()[hidden])
                txt_tpos.append(offset + hidden)
                txt_tstream.append(torch.full((hidden.numel(),), S_PAIR_TEXT if is_pair else S_TEXT))
            n_text_total += L
            offset += L
        length = offset - start
        lens.append(length)
        token_sample.append(torch.full((length,), s_idx))
        token_pair.append(torch.full((length,), is_pair, dtype=torch.bool))

    n_img = len(images)
    if pending and img_tlist:
        raise ValueError("some images come with visual targets and some without")
    if tok_images and len(tok_images) != n_img:
        raise ValueError("some images come with a tokenizer_image and some without")
    src = torch.cat(token_source)
    src = torch.where(src < 0, n_img * n_img_tok + (-1 - src), src)
    modality = torch.cat(token_mod)
    pair = torch.cat(token_pair)
    C, H = cfg.in_chans, cfg.img_size
    imgs = torch.stack(images) if images else torch.zeros(0, C, H, H)
    masks = torch.stack(image_masks) if image_masks else torch.zeros(0, P, dtype=torch.bool)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)

    def cat_or(xs, empty):
        return torch.cat(xs) if xs else empty

    empty_long = torch.zeros(0, dtype=torch.long)
    if image_targets_are_pixels:
        empty_img_t = torch.zeros(0, cfg.patch_dim)
    else:
        empty_img_t = empty_long
    return PackedBatch(
        images=imgs,
        image_mask=masks,
        text_ids=cat_or(text_ids, empty_long),
        text_pos=cat_or(text_pos, empty_long),
        token_source=src,
        token_sample=torch.cat(token_sample),
        cu_seqlens=cu,
        max_seqlen=max(lens),
        sample_kind=torch.tensor(kinds, dtype=torch.long),
        route=Route.from_expert_ids(modality, 2),
        route_vl=Route.from_expert_ids(torch.where(pair, VL, modality), 3),
        image_target_pos=cat_or(img_tpos, empty_long),
        image_targets=cat_or(img_tlist, empty_img_t),
        image_target_stream=cat_or(img_tstream, empty_long),
        text_target_pos=cat_or(txt_tpos, empty_long),
        text_targets=cat_or(txt_tlist, empty_long),
        text_target_stream=cat_or(txt_tstream, empty_long),
        sources=[s.source for s in samples],
        tokenizer_images=torch.stack(tok_images) if tok_images else None,
        image_targets_pending=pending,
    )
