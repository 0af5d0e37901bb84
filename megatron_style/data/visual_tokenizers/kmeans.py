"""A k-means patch tokenizer that trains on a CPU in seconds to minutes.

Each patch is described by its pixels average-pooled to a `cells x cells` grid (3 * cells^2
numbers, 48 for the default 4x4), in the model's normalised pixel space; the visual token of a
patch is its nearest centroid (Euclidean). No per-patch normalisation: colour is what most
distinguishes demo patches, and BEiT's image targets (DALL-E, VQ-KD tokens) carry colour too.
Pooling keeps the feature small, so assignment is cheap on the training device even for
K = 8192 and 224px images, and training needs no GPU.

Training is Lloyd's algorithm with k-means++ seeding (random seeding above 1024 clusters, where
the sequential seeding would dominate), re-seeding empty clusters with the worst-served points.
"""
from __future__ import annotations

import os
import time
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from megatron_style.data.visual_tokenizers.base import VisualTokenizer
from megatron_style.files import load_untrusted

FORMAT = "megatron_style.kmeans_tokenizer/1"
_CHUNK = 1 << 16   # rows per distance block: bounds memory at K = 8192


def default_cells(patch_size: int) -> int:
    return min(4, patch_size)


def patch_features(images: torch.Tensor, patch: int, cells: int) -> torch.Tensor:
    """[n, C, H, W] -> [n, P, C * cells * cells]: each patch average-pooled to cells x cells."""
    n, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    gh, gw = h // patch, w // patch
    if patch % cells == 0:  # plain reshape-and-mean: much faster than pooling many tiny maps
        k = patch // cells
        x = images.reshape(n, c, gh, cells, k, gw, cells, k).mean((4, 7))
        return x.permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * cells * cells)
    x = images.reshape(n, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    x = x.reshape(n * gh * gw, c, patch, patch)
    return F.adaptive_avg_pool2d(x, cells).reshape(n, gh * gw, c * cells * cells)


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid of each row of x, and the squared distance to it."""
    c2 = (centroids * centroids).sum(1)
    ids, dists = [], []
    for chunk in x.split(_CHUNK):
        d = c2 - 2.0 * chunk @ centroids.t()
        m, i = d.min(1)
        ids.append(i)
        dists.append((m + (chunk * chunk).sum(1)).clamp_(min=0))
    return torch.cat(ids), torch.cat(dists)


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0,
           max_samples: int = 200_000) -> torch.Tensor:
    """[N, D] features -> [k, D] centroids."""
    x = x.float()
    g = torch.Generator().manual_seed(seed)
    if x.shape[0] > max_samples:
        x = x[torch.randperm(x.shape[0], generator=g)[:max_samples]]
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} feature vectors, got {n}; use more images")
    if k <= 1024:
        c = _kmeans_pp(x, k, g)
    else:
        c = x[torch.randperm(n, generator=g)[:k]].clone()
    prev = None
    for _ in range(iters):
        ids, dist = nearest(x, c)
        counts = torch.bincount(ids, minlength=k)
        sums = _cluster_sums(ids, x, k)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp(min=1)[:, None].float())
        if bool(empty.any()):
            worst = dist.topk(int(empty.sum())).indices
            c[empty] = x[worst]
        if prev is not None and torch.equal(prev, ids) and not bool(empty.any()):
            break
        prev = ids
    return c


def _cluster_sums(ids: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the rows of x per cluster, as a sparse one-hot product: on CPU an order of
    magnitude faster than index_add_, whose many colliding rows serialise."""
    n = x.shape[0]
    onehot = torch.sparse_coo_tensor(torch.stack([ids, torch.arange(n)]), torch.ones(n),
                                     (k, n), check_invariants=False)
    return torch.sparse.mm(onehot, x)


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    x2 = (x * x).sum(1)

    def dist_to(j: int) -> torch.Tensor:  # squared distances to point j without an [N, D] temporary
        return (x2 - 2.0 * (x @ x[j]) + x2[j]).clamp_(min=0)

    idx = [int(torch.randint(n, (1,), generator=g))]
    d = dist_to(idx[0])
    for _ in range(1, k):
        total = float(d.sum())
        if total <= 0:  # fewer distinct points than clusters: duplicates are harmless
            j = int(torch.randint(n, (1,), generator=g))
        else:
            j = int(torch.multinomial(d / total, 1, generator=g))
        idx.append(j)
        d = torch.minimum(d, dist_to(j))
    return x[idx].clone()


class KMeansTokenizer(VisualTokenizer):
    needs_tokenizer_images = False

    def __init__(self, centroids: torch.Tensor, patch_size: int, cells: int, img_size: int):
        super().__init__()
        if centroids.dim() != 2 or centroids.shape[1] != 3 * cells * cells:
            raise ValueError(f"centroids of shape {tuple(centroids.shape)} do not match "
                             f"{cells}x{cells} cells of 3 channels")
        self.register_buffer("centroids", centroids.float().contiguous())
        self.patch_size, self.cells, self.input_size = patch_size, cells, img_size
        self.vocab_size = int(centroids.shape[0])

    @torch.no_grad()
    def forward(self, images: torch.Tensor,
                tokenizer_images: Optional[torch.Tensor] = None) -> torch.Tensor:
        f = patch_features(images.float(), self.patch_size, self.cells)
        n, P, D = f.shape
        return nearest(f.reshape(n * P, D), self.centroids)[0].view(n, P)

    def state(self) -> dict:
        return {"format": FORMAT, "centroids": self.centroids.cpu(), "patch_size": self.patch_size,
                "cells": self.cells, "img_size": self.input_size}

    def save(self, path: str) -> None:
        """Write to `path` atomically (a reader never sees half a file)."""
        path = os.path.expanduser(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(self.state(), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "KMeansTokenizer":
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"k-means tokenizer {path!r} does not exist")
        state = load_untrusted(path, "k-means tokenizer file")
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a k-means tokenizer file (expected format "
                             f"{FORMAT!r}; write one with KMeansTokenizer.save or "
                             "beit3-train-tokenizer kmeans)")
        return cls(state["centroids"], state["patch_size"], state["cells"], state["img_size"])


def train_kmeans_tokenizer(images: Iterable[torch.Tensor], patch_size: int, k: int,
                           cells: Optional[int] = None, iters: int = 20, seed: int = 0,
                           max_samples: int = 200_000, log=None) -> KMeansTokenizer:
    """Train on model-view images ([3, S, S] or [n, 3, S, S] tensors, normalised as the model
    sees them)."""
    cells = cells or default_cells(patch_size)
    if not 1 <= cells <= patch_size:
        raise ValueError(f"cells={cells} must be in [1, patch_size={patch_size}]")
    t0 = time.time()
    feats, pending, size = [], [], None

    def flush():
        if pending:
            feats.append(patch_features(torch.cat(pending).float(), patch_size, cells).flatten(0, 1))
            pending.clear()

    for img in images:
        pending.append(img if img.dim() == 4 else img.unsqueeze(0))
        size = pending[-1].shape[-1]
        if len(pending) == 256:
            flush()
    flush()
    if not feats:
        raise ValueError("no images to train the k-means tokenizer on")
    x = torch.cat(feats)
    c = kmeans(x, k, iters=iters, seed=seed, max_samples=max_samples)
    if log:
        log(f"k-means tokenizer: {k} clusters from {x.shape[0]} patches in {time.time() - t0:.1f}s")
    return KMeansTokenizer(c, patch_size, cells, int(size))
