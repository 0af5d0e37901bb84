"""Checks of a packed batch against the model's sizes: shapes and packing metadata always,
values when the tensors are on the CPU. A ValueError names the field and what was expected."""
from __future__ import annotations

import torch

from megatron_style.batch.types import (KIND_IMAGE, KIND_NAMES, KIND_PAIR, KIND_TEXT, LANGUAGE,
                                        POSITION_OFFSET, VISION, VL, PackedBatch)
from megatron_style.config import ModelConfig


def validate_packed(b: PackedBatch, cfg: ModelConfig) -> None:
    P, C, H = cfg.num_patches, cfg.in_chans, cfg.img_size
    S = b.sample_kind.shape[0]
    if S == 0 or b.num_tokens == 0:
        raise ValueError("empty batch: no samples or no tokens")
    if b.images.dim() != 4 or tuple(b.images.shape[1:]) != (C, H, H):
        raise ValueError(f"images have shape {tuple(b.images.shape)}; the model takes "
                         f"[n, {C}, {H}, {H}] ({C} channels at {H}x{H})")
    n_img = b.images.shape[0]
    if tuple(b.image_mask.shape) != (n_img, P):
        raise ValueError(f"image_mask has shape {tuple(b.image_mask.shape)}, expected ({n_img}, {P})")
    nt = b.text_ids.shape[0]
    if b.text_pos.shape != b.text_ids.shape:
        raise ValueError(f"text_pos has shape {tuple(b.text_pos.shape)}, text_ids {tuple(b.text_ids.shape)}")
    T = b.num_tokens
    if n_img * (P + 1) + nt != T:
        raise ValueError(f"inconsistent packing: {n_img} images x {P + 1} tokens + {nt} text "
                         f"tokens = {n_img * (P + 1) + nt}, but the stream has {T} tokens")
    if b.cu_seqlens.shape != (S + 1,):
        raise ValueError(f"inconsistent packing: cu_seqlens has {b.cu_seqlens.shape[0]} entries "
                         f"for {S} samples (expected {S + 1})")
    for name in ("token_sample",):
        if getattr(b, name).shape != (T,):
            raise ValueError(f"inconsistent packing: {name} has shape "
                             f"{tuple(getattr(b, name).shape)}, expected ({T},)")
    for name, r, n in (("route", b.route, 2), ("route_vl", b.route_vl, 3)):
        if len(r.counts) != n or sum(r.counts) != T or r.perm.shape != (T,):
            raise ValueError(f"inconsistent packing: {name} counts {r.counts} do not cover the "
                             f"{T} tokens with {n} experts")
    if b.image_targets_pending:
        raise ValueError("the visual targets of this batch have not been computed yet: run the "
                         "visual tokenizer and batch.with_image_targets(...) before the model")
    if b.image_target_pos.shape[0] != b.image_targets.shape[0]:
        raise ValueError("inconsistent packing: image_target_pos and image_targets differ in length")
    if b.text_target_pos.shape[0] != b.text_targets.shape[0]:
        raise ValueError("inconsistent packing: text_target_pos and text_targets differ in length")
    if b.token_source.is_cuda:
        return  # value checks below would stall the GPU; the loader ran them on the CPU
    cu = b.cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != T or bool((lens <= 0).any()):
        raise ValueError(f"inconsistent packing: cu_seqlens must rise strictly from 0 to {T}, "
                         f"got {cu.tolist()[:8]}{'...' if S > 7 else ''}")
    if int(lens.max()) > b.max_seqlen:
        raise ValueError(f"inconsistent packing: max_seqlen {b.max_seqlen} < longest sample "
                         f"{int(lens.max())}")
    _check_stream_values(b, n_img * (P + 1), lens)
    if nt:
        lo, hi = int(b.text_ids.min()), int(b.text_ids.max())
        if lo < 0 or hi >= cfg.text_vocab_size:
            bad = hi if hi >= cfg.text_vocab_size else lo
            raise ValueError(f"token id {bad} is out of the text vocabulary "
                             f"[0, {cfg.text_vocab_size})")
        if int(b.text_pos.min()) < POSITION_OFFSET:
            raise ValueError(f"inconsistent packing: text_pos counts from {POSITION_OFFSET} "
                             f"(fairseq convention), got {int(b.text_pos.min())}")
        if int(b.text_pos.max()) >= cfg.max_text_len + POSITION_OFFSET:
            raise ValueError(f"a text has {int(b.text_pos.max()) - POSITION_OFFSET + 1} tokens; "
                             f"the position table takes at most max_text_len={cfg.max_text_len}")
    if b.text_targets.numel() and (int(b.text_targets.min()) < 0
                                   or int(b.text_targets.max()) >= cfg.text_vocab_size):
        raise ValueError(f"text target ids must be in [0, {cfg.text_vocab_size})")
    if not b.image_targets.dtype.is_floating_point and b.image_targets.numel():
        if int(b.image_targets.min()) < 0 or int(b.image_targets.max()) >= cfg.visual_vocab_size:
            raise ValueError(f"visual target ids must be in [0, {cfg.visual_vocab_size})")
    for name in ("image_target_pos", "text_target_pos"):
        pos = getattr(b, name)
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= T):
            raise ValueError(f"inconsistent packing: {name} points outside the {T}-token stream")


def _check_stream_values(b: PackedBatch, image_rows: int, lens: torch.Tensor) -> None:
    """The metadata that indexes tensors and routes tokens. Wrong values would fail deep inside
    the forward pass, or worse, silently send tokens to the wrong expert or sample."""
    T, S = b.num_tokens, lens.shape[0]
    src = b.token_source.long()
    if int(src.min()) < 0 or int(src.max()) >= T:
        raise ValueError(f"inconsistent packing: token_source values must be rows 0..{T - 1} of "
                         f"the embedded tokens, got [{int(src.min())}, {int(src.max())}]")
    if not torch.equal(b.token_sample.long(), torch.repeat_interleave(torch.arange(S), lens)):
        raise ValueError("inconsistent packing: token_sample does not number the tokens by the "
                         "samples that cu_seqlens lays out")
    kinds = b.sample_kind.long()
    if int(kinds.min()) < 0 or int(kinds.max()) >= len(KIND_NAMES):
        raise ValueError(f"inconsistent packing: sample_kind values must be in 0..{len(KIND_NAMES) - 1} "
                         f"({', '.join(KIND_NAMES)}), got {kinds.unique().tolist()}")
    vision = src < image_rows
    n_vision = torch.zeros(S, dtype=torch.long).index_add_(0, b.token_sample.long(), vision.long())
    expected_kind = torch.where(n_vision == lens, KIND_IMAGE, torch.where(n_vision == 0, KIND_TEXT, KIND_PAIR))
    if not torch.equal(kinds, expected_kind):
        j = int((kinds != expected_kind).nonzero()[0])
        raise ValueError(f"inconsistent packing: sample {j} is marked {KIND_NAMES[int(kinds[j])]!r} but "
                         f"holds {int(n_vision[j])} image and {int(lens[j] - n_vision[j])} text tokens")
    modality = torch.where(vision, VISION, LANGUAGE)
    for name, r, expert in (("route", b.route, modality),
                            ("route_vl", b.route_vl, torch.where((kinds == KIND_PAIR)[b.token_sample.long()],
                                                                 VL, modality))):
        want = tuple(torch.bincount(expert, minlength=len(r.counts)).tolist())
        if tuple(r.counts) != want:
            raise ValueError(f"inconsistent packing: {name} counts {tuple(r.counts)}, but the stream "
                             f"holds {want} tokens per expert")
        perm, inv = r.perm.long(), r.inv.long()
        ok = (perm.shape == inv.shape == (T,) and int(perm.min()) >= 0 and int(perm.max()) < T
              and int(inv.min()) >= 0 and int(inv.max()) < T)
        ok = ok and torch.equal(inv[perm], torch.arange(T))
        ok = ok and torch.equal(expert[perm], torch.repeat_interleave(torch.arange(len(want)),
                                                                      torch.tensor(want)))
        if not ok:
            raise ValueError(f"inconsistent packing: {name}.perm must list the stream positions "
                             f"sorted by expert and {name}.inv its inverse")
