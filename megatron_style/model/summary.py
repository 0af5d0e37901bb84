"""Parameters by group and training FLOPs per sample of a model preset, from the built model,
and what ITC and ITM add per image-text pair.

    beit3-summary --preset giant [--text-len 64] [key=value ...]
    beit3-summary --dump-presets configs/model

The model is built on the meta device (shapes without memory), so the 1.9B giant is summarised
in seconds on a laptop. `--dump-presets` writes config.MODEL_PRESETS as one YAML file per
preset (tests/model/test_preset_files.py fails when those files drift from the presets).
"""
from __future__ import annotations

import os
from typing import Optional

import torch.nn as nn
import yaml

from megatron_style.config import MODEL_PRESETS, MaskingConfig, model_config
from megatron_style.model.flops import build_on_meta, sample_flops

# Parameter groups, matched on the name's prefix (after an optional "beit3."); a parameter in
# none of them is an error, so a new module cannot be left out of the totals unnoticed.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vision experts", ("layers.*.ffn.experts.0.",)),
    ("language experts", ("layers.*.ffn.experts.1.",)),
    ("vision-language experts", ("layers.*.ffn.experts.2.",)),
    ("attention", ("layers.*.attn.",)),
    ("embeddings", ("text_embed.", "vision_embed.", "pos_vision.", "pos_text.")),
    ("output norms", ("final_norm.",)),
    ("heads", ("text_head.", "image_head.")),
)


def _group_of(name: str) -> str:
    body = name[len("beit3."):] if name.startswith("beit3.") else name
    parts = body.split(".")
    if parts[0] == "layers" and len(parts) > 1:
        body = ".".join(["layers", "*"] + parts[2:])
    for group, prefixes in GROUPS:
        if any(body.startswith(p) for p in prefixes):
            return group
    raise ValueError(f"parameter {name!r} belongs to no group of the summary; add it to GROUPS")


def parameter_groups(model: nn.Module) -> dict[str, int]:
    """Parameter count per group (GROUPS order; empty groups kept as 0)."""
    counts = {g: 0 for g, _ in GROUPS}
    for name, p in model.named_parameters():
        counts[_group_of(name)] += p.numel()
    return counts


def _size(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3f}{unit}" if unit == "B" else f"{n / div:.2f}{unit}"
    return str(int(n))


def summary_text(preset: Optional[str], overrides: dict, text_len: int) -> str:
    cfg = model_config(preset, **overrides)
    model = build_on_meta(cfg)
    groups = parameter_groups(model)
    total = sum(groups.values())
    m = MaskingConfig()
    lines = [f"model: {preset or 'custom'}: {cfg.layers} layers, dim {cfg.dim}, ffn {cfg.ffn_dim}, "
             f"{cfg.heads} heads, patch {cfg.patch_size} at {cfg.img_size}px, attention "
             f"{cfg.attention}, VL layers {cfg.vl_layers}, text vocab {cfg.text_vocab_size}, "
             f"visual vocab {cfg.visual_vocab_size}",
             "parameters:"]
    lines += [f"  {g:<26}{_size(n):>10}  {n:>14,}" for g, n in groups.items()]
    lines.append(f"  {'total':<26}{_size(total):>10}  {total:>14,}")
    lines.append(f"training FLOPs per sample (3 x forward; heads on masked positions: "
                 f"{m.image_ratio:.0%} of an image's patches, {m.pair_image_ratio:.0%} of a "
                 f"pair's, {m.text_ratio:.0%} of a text, {m.pair_text_ratio:.0%} of a pair's "
                 "text):")
    img, txt = cfg.image_tokens, text_len
    for kind, what in (("image", f"{img} tokens"), ("text", f"{txt} tokens"),
                       ("pair", f"{img} + {txt} tokens")):
        f = sample_flops(model, kind, text_len=text_len)
        lines.append(f"  {kind + ' (' + what + ')':<26}{f / 1e12:>10.3f} TFLOP")
    # What the objectives beyond MDM add per image-text pair, counted as the trainer counts
    # them: ITC encodes the pair's image and text apart, ITM runs the pair and its two
    # negatives on the fusion path; both unmasked, without MDM heads.
    lines.append("added per image-text pair by ITC / ITM (unmasked, no MDM heads):")
    itc = (sample_flops(model, "image", masked_patches=0)
           + sample_flops(model, "text", text_len=text_len, masked_text=0))
    lines.append(f"  {'ITC (image, text apart)':<26}{itc / 1e12:>10.3f} TFLOP")
    if cfg.vl_layers > 0:
        itm = 3 * sample_flops(model, "pair", text_len=text_len, masked_patches=0, masked_text=0)
        lines.append(f"  {'ITM (pair + 2 negatives)':<26}{itm / 1e12:>10.3f} TFLOP")
    else:
        lines.append(f"  {'ITM':<26}{'-':>10}        (needs VL experts: model.vl_layers > 0)")
    return "\n".join(lines)


def render_preset(name: str) -> str:
    """configs/model/<name>.yaml: the preset's fields, readable, with where they come from."""
    header = (f"# Model preset {name!r}: a dump of megatron_style.config.MODEL_PRESETS[{name!r}].\n"
              f"# Written by `beit3-summary --dump-presets configs/model`;\n"
              f"# edit the preset in config/model.py and re-run it (a test fails when they differ).\n"
              f"# Use in a recipe as `model: {{preset: {name}}}`, or these keys under `model:`.\n")
    return header + yaml.safe_dump(dict(MODEL_PRESETS[name]), sort_keys=False)


def dump_presets(directory: str) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name in MODEL_PRESETS:
        path = os.path.join(directory, f"{name}.yaml")
        with open(path, "w") as f:
            f.write(render_preset(name))
        paths.append(path)
    return paths
