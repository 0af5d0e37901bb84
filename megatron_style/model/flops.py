"""Training FLOPs of the Multiway Transformer, counted from the built model (for MFU and the
summary), never from retyped sizes.

Forward FLOPs of one token = 2 x the matmul weights it actually meets: in each layer the
attention projections of its way (q, k, v, out) and the FFN expert it is routed to (vision or
language; vision-language for every token of a pair in the top layers). On top of that:
  attention scores and values   2 * 2 * L * d per token per layer (L = its sample's length,
                                d = the attention width), i.e. 4 * L^2 * d per sample and layer;
  patch embedding               2 * patch_dim * dim per image patch (a matmul as a conv);
  prediction heads              2 * dim * vocabulary per masked position only.
Training = 3 x forward (backward = 2 x forward); activation recomputation is not counted, as
is usual for MFU. Biases, LayerNorms, GELU and softmax are left out (a few per cent at most).

The weights are read from the modules as this process holds them: under tensor parallelism
the counts are this rank's share (the full model's count divided by the TP degree).

For the trainer: `batch_flops(model, batch)` each step. The per-model constants are computed
once per model (cached); per batch only host-side numbers are used: the routes' token counts,
the number of images and masked targets, and the sample lengths from cu_seqlens (pass the
loader's CPU batch, or the lengths come back from the device).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from megatron_style.config import MaskingConfig, ModelConfig
from megatron_style.batch import LANGUAGE, VISION, VL, PackedBatch
from megatron_style.parallel.layers import ColumnParallelLinear, RowParallelLinear

# Classes of token by the experts they meet: an image's tokens, a text's, and the two halves
# of a pair (which share the VL expert in the top layers but not the attention ways below).
TOKEN_CLASSES = ("image", "text", "pair_image", "pair_text")
_LINEARS = (nn.Linear, ColumnParallelLinear, RowParallelLinear)


def matmul_params(module: nn.Module) -> int:
    """Weights of the linear layers inside `module` (each is one multiply-add per token)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, _LINEARS))


@dataclass(frozen=True)
class FlopConstants:
    """Forward FLOPs of one model, per unit of work."""

    per_token: dict[str, int]      # TOKEN_CLASSES -> FLOPs through all layers (projections + FFN)
    per_patch: int                 # the patch embedding, per image patch
    attention_per_len2: int        # x L^2 for one sample of L tokens, all layers
    text_head: int                 # per masked text token
    image_head: int                # per masked image patch
    by_expert: dict[str, int]      # per token, summed over the layers that have it


def _unwrap(model: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    """(encoder, model with heads or None), through DeepSpeed / DDP wrappers (`.module`)."""
    while not hasattr(model, "layers") and not hasattr(model, "beit3") and hasattr(model, "module"):
        model = model.module
    if hasattr(model, "beit3"):
        return model.beit3, model
    if hasattr(model, "layers"):
        return model, None
    raise TypeError(f"expected a MaskedDataModel or MultiwayTransformer, got {type(model).__name__}")


_CACHE: "weakref.WeakKeyDictionary[nn.Module, FlopConstants]" = weakref.WeakKeyDictionary()


def flop_constants(model: nn.Module) -> FlopConstants:
    """Walk the built model once; cached per model object."""
    if model in _CACHE:
        return _CACHE[model]
    encoder, full = _unwrap(model)
    per_token = dict.fromkeys(TOKEN_CLASSES, 0)
    by_expert: dict[str, int] = {}
    attention_width = 0
    for block in encoder.layers:
        attn, experts = block.attn, block.ffn.experts
        way = [matmul_params(attn.q_proj[i]) + matmul_params(attn.k_proj[i])
               + matmul_params(attn.v_proj[i]) + matmul_params(attn.out_proj[i])
               for i in range(attn.ways)]
        way_of = {VISION: way[VISION % attn.ways], LANGUAGE: way[LANGUAGE % attn.ways]}
        ffn = [matmul_params(e) for e in experts]
        pair_expert = {m: VL if len(experts) > VL else m for m in (VISION, LANGUAGE)}
        for cls, modality, pair in (("image", VISION, False), ("text", LANGUAGE, False),
                                    ("pair_image", VISION, True), ("pair_text", LANGUAGE, True)):
            expert = pair_expert[modality] if pair else modality
            per_token[cls] += 2 * (way_of[modality] + ffn[expert])
        for name, w in (("attention_vision", way_of[VISION]), ("attention_language", way_of[LANGUAGE])):
            by_expert[name] = by_expert.get(name, 0) + 2 * w
        for name, f in zip(("vision", "language", "vision_language"), ffn):
            by_expert[name] = by_expert.get(name, 0) + 2 * f
        attention_width += attn.local_heads * attn.head_dim
    heads = {"text_head": 0, "image_head": 0}
    if full is not None:
        heads = {"text_head": 2 * matmul_params(full.text_head),
                 "image_head": 2 * matmul_params(full.image_head)}
    by_expert.update(heads)
    c = FlopConstants(per_token=per_token, per_patch=2 * encoder.vision_embed.proj.weight.numel(),
                      attention_per_len2=4 * attention_width, by_expert=by_expert, **heads)
    _CACHE[model] = c
    return c


def flops_per_token_by_expert(model: nn.Module) -> dict[str, int]:
    """Forward FLOPs one token spends in each part, summed over the layers that have it:
    vision / language / vision_language experts, attention_vision / attention_language
    projections (equal in the shared layout), and text_head / image_head (per masked token).
    Attention scores (which depend on the sample length) are not included."""
    return dict(flop_constants(model).by_expert)


def _forward_flops(c: FlopConstants, tokens: dict[str, int], patches: int, sum_len2: float,
                   masked_text: int, masked_patches: int) -> float:
    return (sum(float(c.per_token[k]) * n for k, n in tokens.items())
            + float(c.per_patch) * patches + float(c.attention_per_len2) * sum_len2
            + float(c.text_head) * masked_text + float(c.image_head) * masked_patches)


def batch_flops(model: nn.Module, batch: PackedBatch, training: bool = True) -> float:
    """FLOPs of one forward (+ backward when training) of `model` on a packed batch."""
    c = flop_constants(model)
    vision, language = batch.route.counts
    vision_alone, language_alone = batch.route_vl.counts[:2]
    tokens = {"image": vision_alone, "text": language_alone,
              "pair_image": vision - vision_alone, "pair_text": language - language_alone}
    patches = int(batch.image_mask.shape[0]) * int(batch.image_mask.shape[1])
    lens = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
    sum_len2 = float(lens.double().pow(2).sum())
    # Target positions, not targets: a loader batch gets its visual targets on the device.
    f = _forward_flops(c, tokens, patches, sum_len2, int(batch.text_target_pos.shape[0]),
                       int(batch.image_target_pos.shape[0]))
    return 3.0 * f if training else f


def sample_flops(model_or_cfg: Union[nn.Module, ModelConfig], kind: str, text_len: int = 0,
                 masked_patches: Optional[int] = None, masked_text: Optional[int] = None,
                 training: bool = True) -> float:
    """FLOPs of one sample: kind "image", "text" (text_len tokens) or "pair". Masked counts
    default to the paper's ratios (MaskingConfig: 40% of patches, 15% of a text's tokens, 50%
    of a pair's). A ModelConfig is built into a model on the meta device first (no memory)."""
    model = model_or_cfg
    if isinstance(model_or_cfg, ModelConfig):
        model = build_on_meta(model_or_cfg)
    encoder, _ = _unwrap(model)
    cfg = encoder.cfg
    if kind not in ("image", "text", "pair"):
        raise ValueError(f"kind {kind!r} is not one of 'image', 'text', 'pair'")
    has_img, has_txt = kind != "text", kind != "image"
    if has_txt and not 1 <= text_len <= cfg.max_text_len:
        raise ValueError(f"text_len {text_len} must be in [1, max_text_len={cfg.max_text_len}] "
                         f"for a {kind} sample")
    m = MaskingConfig()
    if masked_patches is None:
        ratio = m.pair_image_ratio if kind == "pair" else m.image_ratio
        masked_patches = round(ratio * cfg.num_patches) if has_img else 0
    if masked_text is None:
        ratio = m.pair_text_ratio if kind == "pair" else m.text_ratio
        masked_text = max(1, round(ratio * text_len)) if has_txt else 0
    img_tokens = cfg.image_tokens if has_img else 0
    txt_tokens = text_len if has_txt else 0
    pair = kind == "pair"
    tokens = {"image": 0 if pair else img_tokens, "text": 0 if pair else txt_tokens,
              "pair_image": img_tokens if pair else 0, "pair_text": txt_tokens if pair else 0}
    L = img_tokens + txt_tokens
    f = _forward_flops(flop_constants(model), tokens, cfg.num_patches if has_img else 0,
                       float(L * L), masked_text, masked_patches)
    return 3.0 * f if training else f


def build_on_meta(cfg: ModelConfig) -> nn.Module:
    """The MaskedDataModel of `cfg` with every tensor on the meta device: shapes without memory
    (a 1.9B giant builds in seconds on a laptop)."""
    from megatron_style.model.pretraining import MaskedDataModel

    with torch.device("meta"):
        return MaskedDataModel(cfg)
