"""Import and export of the released BEiT-3 checkpoint layout (microsoft/torchscale's BEiT3).

Released files hold {"model": state_dict} with keys such as
    beit3.encoder.layers.3.self_attn.q_proj.B.weight
where A is the vision way and B the language way. They map onto the `decoupled` model:
    beit3.layers.3.attn.q_proj.1.weight
The prediction heads are not part of torchscale; we write them as `mlm_head.*` (text) and
`mim_head.*` (visual tokens) beside the `beit3.*` keys, and read files with or without them.
The image-text contrastive heads of unilm's BEiT3ForRetrieval (the ITC-tuned and retrieval
files: top-level `vision_head.weight`, `language_head.weight`, `logit_scale`) are ours under
`itc.` (model/contrastive.py): a model with a ContrastiveHeads at attribute `itc` loads and
exports them; a model without one ignores them, saying so. Export after import reproduces
every tensor exactly.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Union

import torch
import torch.nn as nn

from megatron_style.batch import POSITION_OFFSET

# Released name <-> our name. {n}: layer, {p}: projection, {t}: weight/bias,
# {W}: released way letter (A vision, B language) <-> {w}: our way index (0, 1).
_RULES: list[tuple[str, str]] = [
    ("text_embed.weight", "text_embed.weight"),
    ("vision_embed.proj.{t}", "vision_embed.proj.{t}"),
    ("vision_embed.cls_token", "vision_embed.cls_token"),
    ("vision_embed.mask_token", "vision_embed.mask_token"),
    ("encoder.embed_positions.A.weight", "pos_vision.weight"),
    ("encoder.embed_positions.B.weight", "pos_text.weight"),
    ("encoder.layers.{n}.self_attn.{p}_proj.{W}.{t}", "layers.{n}.attn.{p}_proj.{w}.{t}"),
    ("encoder.layers.{n}.self_attn.inner_attn_ln.{W}.{t}", "layers.{n}.attn.inner_norm.{w}.{t}"),
    ("encoder.layers.{n}.self_attn_layer_norm.{W}.{t}", "layers.{n}.attn.norm.{w}.{t}"),
    ("encoder.layers.{n}.ffn.{W}.{f}.{t}", "layers.{n}.ffn.experts.{w}.{f}.{t}"),
    ("encoder.layers.{n}.ffn.{W}.ffn_layernorm.{t}", "layers.{n}.ffn.experts.{w}.ffn_norm.{t}"),
    ("encoder.layers.{n}.final_layer_norm.{W}.{t}", "layers.{n}.ffn.experts.{w}.norm.{t}"),
    ("encoder.layer_norm.{W}.{t}", "final_norm.{w}.{t}"),
]
_FIELDS = {"n": r"\d+", "p": "q|k|v|out", "t": "weight|bias", "f": "fc1|fc2", "W": "A|B", "w": "0|1"}
_HEADS = {"mlm_head": "text_head", "mim_head": "image_head"}
# Released (unilm BEiT3ForRetrieval) name -> ours, for the contrastive heads.
_ITC = {"vision_head.weight": "itc.vision_head.weight",
        "language_head.weight": "itc.language_head.weight",
        "logit_scale": "itc.logit_scale"}
_ITC_BACK = {v: k for k, v in _ITC.items()}


def _has_itc(own: Mapping[str, torch.Tensor]) -> bool:
    return any(k in own for k in _ITC_BACK)


def _regex(template: str) -> "re.Pattern[str]":
    out = re.escape(template)
    for name, alt in _FIELDS.items():
        out = out.replace(re.escape("{" + name + "}"), f"(?P<{name}>{alt})")
    return re.compile(out)


_COMPILED = [(_regex(a), a, _regex(b), b) for a, b in _RULES]


def _translate(key: str, to_ours: bool) -> Union[str, None]:
    for rel_re, rel_t, our_re, our_t in _COMPILED:
        m = (rel_re if to_ours else our_re).fullmatch(key)
        if m:
            g = m.groupdict()
            if "W" in g:
                g["w"] = str("AB".index(g["W"]))
            if "w" in g:
                g["W"] = "AB"[int(g["w"])]
            return (our_t if to_ours else rel_t).format(**g)
    return None


def _to_ours(key: str) -> Union[str, None]:
    return _translate(key, to_ours=True)


def _to_released(key: str) -> Union[str, None]:
    return _translate(key, to_ours=False)


def _unwrap(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for k in ("model", "module", "state_dict"):
        if k in sd and isinstance(sd[k], Mapping):
            return dict(sd[k])
    return dict(sd)


def released_to_ours(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a released state dict to our names (`beit3.` prefix kept on encoder keys, heads
    renamed). Returns (mapped, keys that matched no rule)."""
    sd = _unwrap(sd)
    out, unknown = {}, []
    for k, v in sd.items():
        if k in _ITC:
            # unilm's logit_scale is 0-d, ours [1] (model/contrastive.py says why)
            out[_ITC[k]] = v.reshape(1) if k == "logit_scale" and v.dim() == 0 else v
            continue
        head = k.split(".", 1)
        if head[0] in _HEADS and len(head) == 2:
            out[f"{_HEADS[head[0]]}.{head[1]}"] = v
            continue
        body = k[len("beit3."):] if k.startswith("beit3.") else k
        ours = _to_ours(body)
        if ours is None:
            unknown.append(k)
        else:
            out[f"beit3.{ours}"] = v
    return out, unknown


def _released_name(ours: str, bare: bool) -> str:
    """Our parameter name (as in model.state_dict()) in the released layout, for messages."""
    if not bare and ours in _ITC_BACK:
        return _ITC_BACK[ours]
    first, _, rest = ours.partition(".")
    back_heads = {v: k for k, v in _HEADS.items()}
    if not bare and first in back_heads:
        return f"{back_heads[first]}.{rest}"
    body = ours if bare else (rest if first == "beit3" else ours)
    rel = _to_released(body)
    return f"beit3.{rel}" if rel is not None else ours


# Keys of released files that are not part of a masked-data model, and why they are left out.
# (unilm's BEiT3ForRetrieval / ITC tuning, and its fine-tuning task heads.) The first entry
# applies only to models without contrastive heads (`itc`), which load those keys instead.
_ITC_KEYS = re.compile(r"^(logit_scale$|vision_head\.|language_head\.)")
_NOT_PRETRAINING = [
    (_ITC_KEYS,
     "the image-text contrastive heads of the ITC-tuned and retrieval files (vision_head, "
     "language_head, logit_scale): masked data modeling has no use for them"),
    (re.compile(r"^(head\.|fc_norm\.|pooler\.)"),
     "a fine-tuning task's head (classification fc_norm + head, VQA pooler + head, NLVR2 "
     "head): not part of the pretrained encoder"),
]


def _shown(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} keys)" if len(keys) > limit else "")


def fit_released_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]
                            ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Make a released BEiT-3 file fit `model` for `checkpoint.init_from`, saying what was done
    (one line each): keys of retrieval / ITC / fine-tuning heads ignored, the vision position
    table resized to the model's grid as unilm does (`resize_vision_positions`), a longer text
    position table cut to the model's rows, prediction heads of the wrong size ignored, and
    heads the file lacks left to model.init. A model with contrastive heads (`itc`, see
    model/contrastive.py) keeps the file's vision_head / language_head / logit_scale, or, when
    the file has none (a pretrained file), reports them created by the init. Everything else
    must fit exactly (`load_released_state_dict` says what does not)."""
    from megatron_style.model.embeddings import resize_vision_positions
    sd = _unwrap(sd)
    own = model.state_dict()
    bare = not hasattr(model, "beit3")
    cfg = getattr(model, "cfg", None)
    report: list[str] = []
    ignored: dict[str, list[str]] = {}
    kept: dict[str, torch.Tensor] = {}
    itc = not bare and _has_itc(own)
    for k, v in sd.items():
        why = next((w for pat, w in _NOT_PRETRAINING
                    if pat.match(k) and not (itc and pat is _ITC_KEYS)), None)
        if why is None:
            kept[k] = v
        else:
            ignored.setdefault(why, []).append(k)
    for why, keys in ignored.items():
        report.append(f"ignored {_shown(keys)}: {why}")
    for k in list(kept):
        first = k.split(".", 1)[0]
        if k in _ITC:
            continue  # loaded as they are; a wrong shape is the loader's to report
        if first in _HEADS:
            if bare:
                continue  # heads are not an encoder's business (load_released_state_dict)
            ours = f"{_HEADS[first]}.{k.split('.', 1)[1]}"
        else:
            body = k[len("beit3."):] if k.startswith("beit3.") else k
            ours = _to_ours(body)
            if ours is None:
                continue
            ours = ours if bare else f"beit3.{ours}"
        if ours not in own or tuple(kept[k].shape) == tuple(own[ours].shape):
            continue
        v, want = kept[k], tuple(own[ours].shape)
        if ours.endswith("pos_vision.weight") and cfg is not None and v.dim() == 2:
            g0 = math.isqrt(max(0, v.shape[0] - POSITION_OFFSET - 1))
            try:
                kept[k] = resize_vision_positions(v, cfg.grid)
            except ValueError:
                continue  # not a square grid: the shape mismatch is reported by the loader
            report.append(f"interpolated {k}: {g0}x{g0} -> {cfg.grid}x{cfg.grid} patches "
                          f"({v.shape[0]} -> {want[0]} rows; bicubic, the {POSITION_OFFSET + 1} "
                          "leading rows kept, as unilm's load_model_and_may_interpolate)")
        elif ours.endswith("pos_text.weight") and v.dim() == 2 and v.shape[0] > want[0] \
                and v.shape[1:] == want[1:]:
            kept[k] = v[:want[0]].clone()
            report.append(f"cut {k} from {v.shape[0]} to {want[0]} rows (model.max_text_len="
                          f"{want[0] - POSITION_OFFSET}): positions beyond the model's longest "
                          "text are dropped")
        elif ours.split(".", 1)[0] in _HEADS.values():
            del kept[k]
            report.append(f"ignored {k}: its shape {tuple(v.shape)} does not fit the model's "
                          f"{ours} {want}; that head is drawn by model.init instead")
    if not bare:
        have = {f"{_HEADS[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}" for k in kept
                if k.split(".", 1)[0] in _HEADS}
        created = sorted(k for k in own if k.split(".", 1)[0] in _HEADS.values() and k not in have)
        if created:
            how = f"model.init={cfg.init}" if cfg is not None else "the model's init"
            report.append(f"created {_shown(created)}: no prediction head in the file (released "
                          f"pretrained files have none); drawn by {how}")
    if itc:
        absent = [r for r, o in _ITC.items() if o in own and r not in kept]
        if absent:
            how = f"model.init={cfg.init}" if cfg is not None else "the model's init"
            report.append(f"created {_shown(absent)}: no contrastive heads in the file (only "
                          f"the ITC-tuned and retrieval files have them); heads drawn by "
                          f"{how}, logit_scale = log(1/0.07)")
    return kept, report


def load_released_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor],
                             require_heads: bool = False) -> None:
    """Load a released-layout state dict into a `decoupled` MaskedDataModel, a
    ContrastiveModel, any model with a `beit3` encoder and these heads, or a bare
    MultiwayTransformer. Heads (mlm_head / mim_head, and vision_head / language_head /
    logit_scale for a model with `itc`) may be absent unless `require_heads`; they then keep
    their init. Raises ValueError listing missing, unexpected and mis-shaped keys."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.attention != "decoupled":
        raise ValueError(f"the released layout has per-modality attention; build the model with "
                         f"model.attention=decoupled (got {cfg.attention!r})")
    mapped, unknown = released_to_ours(sd)
    bare = not hasattr(model, "beit3")
    if bare:
        mapped = {k[len("beit3."):]: v for k, v in mapped.items() if k.startswith("beit3.")}
    own = model.state_dict()
    optional = set() if require_heads or bare else \
        {k for k in own if k.split(".")[0] in _HEADS.values() or k in _ITC_BACK}
    # Messages use the released names: those are what the user's file holds.
    missing = sorted(_released_name(k, bare) for k in own if k not in mapped and k not in optional)
    unexpected = sorted(unknown + [_released_name(k, bare) for k in mapped if k not in own])
    shapes = sorted(f"{_released_name(k, bare)}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in mapped.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        lines = ["the checkpoint does not fit this model (released key names):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                lines.append(f"  {title} ({len(items)}): {shown}")
        raise ValueError("\n".join(lines))
    with torch.no_grad():
        for k, v in mapped.items():
            own[k].copy_(v)


def export_released_state_dict(model: nn.Module, with_heads: bool = True) -> dict[str, torch.Tensor]:
    """Our decoupled model's weights in the released layout (keys `beit3.*`, `mlm_head.*`,
    `mim_head.*`, and `vision_head.weight`, `language_head.weight`, `logit_scale` for a model
    with contrastive heads; `with_heads=False` writes the encoder alone). Wrap as
    {"model": ...} to write a file the BEiT-3 fine-tuning code reads."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.attention != "decoupled":
        raise ValueError("only the decoupled layout has a released-checkpoint equivalent")
    back_heads = {v: k for k, v in _HEADS.items()}
    out = {}
    bare = not hasattr(model, "beit3")
    for k, v in model.state_dict().items():
        if not bare and k in _ITC_BACK:
            if with_heads:
                out[_ITC_BACK[k]] = v.reshape(()) if k == "itc.logit_scale" else v
            continue
        first, rest = k.split(".", 1)
        if not bare and first in back_heads:
            if with_heads:
                out[f"{back_heads[first]}.{rest}"] = v
            continue
        body = k if bare else rest
        rel = _to_released(body)
        if rel is None:
            raise ValueError(f"no released-layout name for parameter {k}")
        out[f"beit3.{rel}"] = v
    return out


def export_retrieval_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights unilm's BEiT3ForRetrieval consists of, in its key names: `beit3.*` plus
    `vision_head.weight`, `language_head.weight`, `logit_scale` (no MDM heads: that class has
    none, and loads non-strictly, so extra keys would only be printed). Wrap as {"model": ...}
    to write a file its `load_model_and_may_interpolate` loads with nothing missing. `model`
    must have contrastive heads at `itc` (a ContrastiveModel, model/contrastive.py)."""
    if not _has_itc(model.state_dict()) or not hasattr(model, "beit3"):
        raise ValueError("the retrieval layout needs a model with an encoder `beit3` and "
                         "contrastive heads `itc` (model.contrastive.ContrastiveModel)")
    return {k: v for k, v in export_released_state_dict(model).items()
            if k.startswith("beit3.") or k in _ITC}
