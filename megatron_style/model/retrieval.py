"""Recall@k of a dual encoder on one-to-one image-text pairs (image i matches text i).

Pure tensor math on the features (any device); the similarity matrix is formed a block of
rows at a time, so 25k x 25k candidates never sit in memory at once. COCO / Flickr30k, with
five captions per image, are not one-to-one: their evaluation needs the image of each caption
(not done here).
"""
from __future__ import annotations

from typing import Sequence

import torch


def _ranks(queries: torch.Tensor, keys: torch.Tensor, chunk: int) -> torch.Tensor:
    """[N] long: for query i, how many keys j != i score at least as high as key i. Ties count
    against the query (pessimistic), so that constant features do not score R@1 = 100."""
    out = []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk]
        sim = q @ keys.t()
        rows = torch.arange(q.shape[0], device=sim.device)
        own = sim[rows, rows + start]
        at_least = (sim >= own.unsqueeze(1)).sum(1) - 1   # minus the true key itself
        out.append(at_least)
    return torch.cat(out)


@torch.no_grad()
def retrieval_recall(img_feats: torch.Tensor, txt_feats: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10), chunk: int = 4096) -> dict[str, float]:
    """Image->text and text->image recall at each k, in percent (as papers report them):
    `i2t_r{k}` is the share of images whose own text is among the k most similar texts (dot
    product: give L2-normalised features for cosine similarity), `t2i_r{k}` the converse;
    `mean_recall` averages the 2 x len(ks) numbers (unilm's retrieval "average_score");
    `candidates` is N, the number each query ranks. Ties go against the true match."""
    if img_feats.dim() != 2 or img_feats.shape != txt_feats.shape or img_feats.shape[0] == 0:
        raise ValueError(f"image features {tuple(img_feats.shape)} and text features "
                         f"{tuple(txt_feats.shape)} must both be [N > 0, dim], row i a pair")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"recall@k needs k >= 1, got {tuple(ks)}")
    img, txt = img_feats.float(), txt_feats.float()
    rank = {"i2t": _ranks(img, txt, chunk), "t2i": _ranks(txt, img, chunk)}
    out: dict[str, float] = {}
    for way, r in rank.items():
        for k in ks:
            out[f"{way}_r{k}"] = 100.0 * float((r < k).double().mean())
    out["mean_recall"] = sum(out.values()) / len(out)
    out["candidates"] = float(img.shape[0])
    return out
