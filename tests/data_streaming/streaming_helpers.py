"""Shared pieces of the streaming tests: tiny shards written on the spot, a small stand-in for
the sample processor, and configs. Importable from a child process (resume tests)."""
from __future__ import annotations

import io
import os
import tarfile
from typing import Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from megatron_style.config import PretrainConfig, from_dict
from megatron_style.data.errors import BadSample
from megatron_style.data.raw import RawSample
from megatron_style.model.batch import Sample


def jpeg_bytes(i: int, size: int = 16) -> bytes:
    """A small JPEG whose colour depends on i."""
    img = Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def png_bytes(i: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (i % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: str, samples: list[dict]) -> str:
    """One shard with the given samples ({"__key__": ..., "jpg": bytes, "txt": str, ...})."""
    with wds.TarWriter(path) as w:
        for s in samples:
            w.write(s)
    return path


def pair(key: str, i: int) -> dict:
    return {"__key__": key, "jpg": jpeg_bytes(i), "txt": f"caption number {i}"}


def write_pair_shards(folder: str, sizes: list[int], prefix: str = "pairs") -> list[str]:
    """Shards of pairs with the given numbers of samples; keys are unique over all shards."""
    os.makedirs(folder, exist_ok=True)
    paths, n = [], 0
    for k, size in enumerate(sizes):
        samples = [pair(f"{k:03d}_{j:04d}", n + j) for j in range(size)]
        n += size
        paths.append(write_tar(os.path.join(folder, f"{prefix}-{k:05d}.tar"), samples))
    return paths


def write_text_shards(folder: str, sizes: list[int], prefix: str = "texts") -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, size in enumerate(sizes):
        samples = [{"__key__": f"t{k:03d}_{j:04d}", "txt": f"document {k} {j} " * 3}
                   for j in range(size)]
        paths.append(write_tar(os.path.join(folder, f"{prefix}-{k:05d}.tar"), samples))
    return paths


def truncate_inside_member(path: str, member: str, into: int = 100) -> None:
    """Cut the shard `into` bytes into the data of `member`."""
    with tarfile.open(path) as t:
        info = t.getmember(member)
    with open(path, "r+b") as f:
        f.truncate(info.offset_data + into)


def key_of(source: str) -> str:
    return source.rsplit("/", 1)[-1]


class StandInProcessor:
    """Does what the real processor's contract says, cheaply: decodes (BadSample 'bad_image'
    when it cannot), resizes, masks with the given generator, tokenizes text as bytes."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.m = cfg.model

    def __call__(self, raw: RawSample, rng: np.random.Generator) -> Sample:
        m = self.m
        s = Sample(source=raw.source)
        if raw.image is not None:
            try:
                img = raw.image.convert("RGB")
            except (OSError, ValueError) as e:
                raise BadSample("bad_image", str(e), raw.source) from None
            img = img.resize((m.img_size, m.img_size))
            s.image = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
            P = m.num_patches
            s.image_mask = torch.from_numpy(rng.permutation(P) < max(1, int(0.4 * P)))
            s.image_targets = torch.zeros(P, dtype=torch.long)
        if raw.text is not None:
            ids = torch.tensor([4 + b % (m.text_vocab_size - 4)
                                for b in raw.text.encode()[: m.max_text_len]])
            mask = torch.from_numpy(rng.random(len(ids)) < 0.15)
            mask[int(rng.integers(len(ids)))] = True
            s.text_targets = ids
            s.text_mask = mask
            s.text = ids.masked_fill(mask, 3)
        return s


def demo_get(kind: str, index: int) -> RawSample:
    """A stand-in for the demo generator: deterministic by (kind, index)."""
    img = Image.open(io.BytesIO(jpeg_bytes(index))) if kind != "text" else None
    text = f"demo {kind} {index}" if kind != "image" else None
    return RawSample(kind=kind, image=img, text=text, source=f"demo/{kind}/{index}")


def make_cfg(source: str = "shards", image: Optional[list[str]] = None,
             text: Optional[list[str]] = None, pair: Optional[list[str]] = None,
             **data) -> PretrainConfig:
    """A tiny-model config; a stream is on when its shards are given (demo: by `weights`)."""
    weights = data.pop("weights", None)
    d = {"source": source, "num_workers": 0, "shuffle_buffer": 4, "micro_batch_size": 3}
    for name, shards in (("image", image), ("text", text), ("pair", pair)):
        w = (weights or {}).get(name, 1.0 if shards or source == "demo" else 0.0)
        d[name] = {"shards": shards or "", "weight": w}
    d.update(data)
    cfg = from_dict(PretrainConfig, {"model": {"preset": "tiny"}, "data": d})
    cfg.validate()
    return cfg


def batch_record(batch) -> list:
    """What identifies a batch's content: sources and the random masks drawn for them."""
    return [batch.sources, batch.image_mask.int().tolist(), batch.text_ids.tolist()]
