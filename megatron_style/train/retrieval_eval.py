"""Zero-shot retrieval with the ITC heads: held-out image-text pairs, each image ranked
against every held-out text and each text against every image (Recall@1/5/10).

    features = pair_features(model, pairs, cfg, prepare)       # ([N, D], [N, D]) unit vectors
    retrieval_recall(*features)                                 # model/retrieval.py

The pairs are unmasked Samples (image and text of one pair each); images go through the
vision experts alone and texts through the language experts alone, exactly as ITC trains them
(model/contrastive.py). Every rank of a ZeRO-3 job must call this with the same pairs (the
forwards gather parameters).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from megatron_style.batch import PackedBatch, Sample, pack_samples
from megatron_style.config import PretrainConfig


def unmasked_pairs(samples: Sequence[Sample]) -> list[Sample]:
    """The image and the whole original text of each pair Sample: hidden text tokens put
    back from `text_targets`, no hidden patches, no targets."""
    out = []
    for s in samples:
        if s.image is None or s.text is None:
            raise ValueError(f"{s.source or 'a sample'} is not an image-text pair")
        text = s.text.clone()
        if s.text_mask is not None and s.text_targets is not None:
            text = torch.where(s.text_mask, s.text_targets.to(text.dtype), text)
        out.append(Sample(image=s.image, image_mask=None, text=text, source=s.source))
    return out


@torch.no_grad()
def pair_features(model, pairs: Sequence[Sample], cfg: PretrainConfig,
                  prepare: Callable[[PackedBatch], PackedBatch],
                  batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, D], [N, D]) L2-normalised ITC features of the pairs' images and texts (fp32, on the
    model's device). `model`: a MaskedDataModel with `itc` heads or a ContrastiveModel."""
    from megatron_style.model.contrastive import dual_encoder_features
    if not hasattr(model, "itc"):
        raise ValueError("retrieval needs the ITC heads (vision_head, language_head): this "
                         "model was trained without objective.itc")
    img, txt = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        images = prepare(pack_samples([Sample(image=s.image, image_mask=None, source=s.source)
                                       for s in chunk], cfg.model))
        texts = prepare(pack_samples([Sample(text=s.text, source=s.source) for s in chunk],
                                     cfg.model))
        i, t = dual_encoder_features(model, images, texts)
        img.append(i.float())
        txt.append(t.float())
    return torch.cat(img), torch.cat(txt)


def format_retrieval(r: dict) -> str:
    n = int(r["candidates"])
    return (f"zero-shot retrieval over {n} held-out pairs (chance R@1 {100 / n:.1f}%): "
            f"image->text R@1/5/10 {r['i2t_r1']:.1f}/{r['i2t_r5']:.1f}/{r['i2t_r10']:.1f}%, "
            f"text->image R@1/5/10 {r['t2i_r1']:.1f}/{r['t2i_r5']:.1f}/{r['t2i_r10']:.1f}%")
