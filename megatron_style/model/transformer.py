"""The Multiway Transformer encoder (BEiT-3).

Two ways in:
  encode(batch)        a PackedBatch mixing images, texts and pairs in one token stream;
  encode_padded(...)   the reference layout: a batch of one kind, [B, L] with a split position
                       (vision tokens first) and text padding, as microsoft/torchscale's BEiT3.
Both run the same blocks on a flat [tokens, dim] tensor; they differ only in how attention
finds the sequence boundaries.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from kernels import dispatch
from megatron_style.config import ModelConfig
from megatron_style.batch import (LANGUAGE, POSITION_OFFSET, VISION, VL, PackedBatch, Route,
                                  validate_packed)
from megatron_style.model.block import MultiwayBlock
from megatron_style.model.embeddings import PositionTable, VisionEmbedding
from megatron_style.model.init import init_rule
from megatron_style.model.layout import TokenLayout
from megatron_style.model.ways import ways_norm, zero_tie
from megatron_style.parallel.layers import VocabParallelEmbedding
from megatron_style.parallel.mappings import TPGroup


class MultiwayTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: Optional[TPGroup] = None):
        super().__init__()
        cfg.validate()
        dispatch.set_mode(cfg.kernels)
        self.cfg, self.tp = cfg, tp
        D, rule = cfg.dim, init_rule(cfg)
        self.text_embed = VocabParallelEmbedding(cfg.text_vocab_size, D, tp, init_std=rule.std,
                                                 init_cut=rule.cut)
        self.vision_embed = VisionEmbedding(cfg)
        self.pos_vision = PositionTable(cfg.image_tokens + POSITION_OFFSET, D, rule.std, rule.cut)
        self.pos_text = PositionTable(cfg.max_text_len + POSITION_OFFSET, D, rule.std, rule.cut)
        self.layers = nn.ModuleList(MultiwayBlock(cfg, i, tp) for i in range(cfg.layers))
        # Output norm, one per modality (vision, language), as in the released checkpoints.
        self.final_norm = nn.ModuleList(nn.LayerNorm(D, eps=cfg.ln_eps) for _ in range(2))
        # Set by the trainer for activation checkpointing: fn(block, x, layout) -> x.
        self.checkpoint_fn: Optional[Callable] = None

    # ---- packed -------------------------------------------------------------------------
    def embed_packed(self, b: PackedBatch) -> torch.Tensor:
        D = self.cfg.dim
        has_img, has_txt = b.images.shape[0] > 0, b.text_ids.shape[0] > 0
        # A modality absent from the batch is not embedded; its parameters are tied in with a
        # zero (added to the other's position rows) so that they still get a gradient.
        unused = [] if has_img else [*self.vision_embed.parameters(), self.pos_vision.weight]
        unused += [] if has_txt else [self.text_embed.weight, self.pos_text.weight]
        tie = zero_tie(unused)
        parts = []
        if has_img:
            img = self.vision_embed(b.images, b.image_mask)
            pos = self.pos_vision.first(self.cfg.image_tokens)
            pos = pos if tie is None else pos + tie
            parts.append((img + pos.to(img.dtype)).reshape(-1, D))
        if has_txt:
            pos = self.pos_text(b.text_pos)
            pos = pos if tie is None or has_img else pos + tie
            txt = self.text_embed(b.text_ids) + pos
            parts.append(txt.to(parts[0].dtype) if parts else txt)
        table = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        return table.index_select(0, b.token_source)

    def layout_packed(self, b: PackedBatch) -> TokenLayout:
        return TokenLayout(route=b.route, route_vl=b.route_vl, token_sample=b.token_sample,
                           num_samples=b.num_samples, cu_seqlens=b.cu_seqlens,
                           max_seqlen=b.max_seqlen)

    def encode(self, b: PackedBatch, final_norm: bool = True) -> torch.Tensor:
        """Hidden states of every token in the packed stream: [T, D]."""
        validate_packed(b, self.cfg)
        layout = self.layout_packed(b)
        x = self.run_blocks(self.embed_packed(b), layout)
        return ways_norm(x, b.route, self.final_norm) if final_norm else x

    def run_blocks(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        for block in self.layers:
            if self.checkpoint_fn is not None and self.training:
                x = self.checkpoint_fn(block, x, layout)
            else:
                x = block(x, layout)
        return x

    def norm_by_modality(self, h: torch.Tensor, modality: int) -> torch.Tensor:
        n = self.final_norm[modality]
        return dispatch.layer_norm(h, n.weight, n.bias, n.eps)

    # ---- padded (reference layout) ------------------------------------------------------
    def encode_padded(self, images: Optional[torch.Tensor] = None,
                      text_ids: Optional[torch.Tensor] = None,
                      text_padding_mask: Optional[torch.Tensor] = None,
                      image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, L, D] for a batch of one kind: images [B, C, H, W] and/or texts [B, Lt] with
        text_padding_mask [B, Lt] (True = padding). Pairs put the image tokens first."""
        cfg = self.cfg
        if images is None and text_ids is None:
            raise ValueError("empty batch: give images, text_ids or both")
        parts, B = [], None
        if images is not None:
            check_images(images, cfg)
            B = images.shape[0]
            if image_mask is not None and tuple(image_mask.shape) != (B, cfg.num_patches):
                raise ValueError(f"image_mask has shape {tuple(image_mask.shape)}, expected "
                                 f"({B}, {cfg.num_patches})")
            x = self.vision_embed(images, image_mask)
            parts.append(x + self.pos_vision.first(cfg.image_tokens).to(x.dtype))
        split = parts[0].shape[1] if parts else 0
        pad = None
        if text_ids is not None:
            check_text_ids(text_ids, cfg)
            if B is not None and text_ids.shape[0] != B:
                raise ValueError(f"{B} images but {text_ids.shape[0]} texts in a pair batch")
            B, Lt = text_ids.shape
            pos = torch.arange(POSITION_OFFSET, POSITION_OFFSET + Lt, device=text_ids.device)
            t = self.text_embed(text_ids) + self.pos_text(pos).to(self.pos_text.weight.dtype)
            if text_padding_mask is not None:
                if text_padding_mask.shape != text_ids.shape:
                    raise ValueError(f"text_padding_mask has shape {tuple(text_padding_mask.shape)}, "
                                     f"text_ids {tuple(text_ids.shape)}")
                t = t * (~text_padding_mask).unsqueeze(-1).to(t.dtype)
                pad = text_padding_mask.bool()
            parts.append(t.to(parts[0].dtype) if parts else t)
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        B, L, D = x.shape
        if pad is not None and split:
            pad = torch.cat([torch.zeros(B, split, dtype=torch.bool, device=x.device), pad], dim=1)
        layout = self.layout_padded(B, L, split if text_ids is not None else L,
                                    pair=images is not None and text_ids is not None,
                                    key_padding_mask=pad, device=x.device)
        h = self.run_blocks(x.reshape(B * L, D), layout)
        return ways_norm(h, layout.route, self.final_norm).view(B, L, D)

    def layout_padded(self, B: int, L: int, split: int, pair: bool,
                      key_padding_mask: Optional[torch.Tensor], device) -> TokenLayout:
        col = torch.arange(L, device=device).repeat(B)
        modality = torch.where(col < split, VISION, LANGUAGE)
        expert_vl = torch.full_like(modality, VL) if pair else modality
        return TokenLayout(route=Route.from_expert_ids(modality, 2),
                           route_vl=Route.from_expert_ids(expert_vl, 3),
                           token_sample=torch.arange(B, device=device).repeat_interleave(L),
                           num_samples=B, padded_shape=(B, L), key_padding_mask=key_padding_mask)


def check_images(images: torch.Tensor, cfg: ModelConfig) -> None:
    C, H = cfg.in_chans, cfg.img_size
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [n, {C}, {H}, {H}] tensor, got shape "
                         f"{tuple(images.shape)}")
    if images.shape[1] != C:
        raise ValueError(f"images have {images.shape[1]} channels; the model takes {C}")
    if tuple(images.shape[2:]) != (H, H):
        raise ValueError(f"images are {images.shape[2]}x{images.shape[3]}; the model takes "
                         f"{H}x{H} (model.img_size)")


def check_text_ids(ids: torch.Tensor, cfg: ModelConfig) -> None:
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"text_ids must be a non-empty [B, L] tensor, got shape {tuple(ids.shape)}")
    if ids.shape[1] > cfg.max_text_len:
        raise ValueError(f"text has {ids.shape[1]} tokens; the position table takes at most "
                         f"max_text_len={cfg.max_text_len}")
    if not ids.is_cuda:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= cfg.text_vocab_size:
            raise ValueError(f"token id {hi if hi >= cfg.text_vocab_size else lo} is out of the "
                             f"text vocabulary [0, {cfg.text_vocab_size})")
