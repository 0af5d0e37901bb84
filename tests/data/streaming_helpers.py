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
from megatron_style.batch import Sample


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


# -- poison data and measured children (tests/faults/test_data_*.py) --------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_members(path: str, members: list[tuple[str, bytes]]) -> str:
    """A tar of exactly these (name, bytes) members, in order, GNU format."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def make_sparse(path: str, name: str, claimed: int) -> None:
    """Turn member `name` (written with 512 bytes of data) into an old-GNU sparse member whose
    512 stored bytes sit at the end of `claimed` bytes of holes, by rewriting its header: what
    a crafted download can hold (tarfile reads it back as `claimed` bytes)."""
    with tarfile.open(path) as t:
        info = t.getmember(name)
    assert info.size == 512, "write the member with 512 bytes of data"
    with open(path, "r+b") as f:
        f.seek(info.offset)
        hdr = bytearray(f.read(512))
        hdr[156:157] = tarfile.GNUTYPE_SPARSE
        hdr[386:398] = b"%011o\0" % (claimed - 512)   # first sparse entry: offset
        hdr[398:410] = b"%011o\0" % 512               # ... and its stored bytes
        hdr[482] = 0                                   # no extension blocks
        hdr[483:495] = b"%011o\0" % claimed           # the size it expands to
        hdr[148:156] = b" " * 8
        hdr[148:156] = b"%06o\0 " % sum(hdr)
        f.seek(info.offset)
        f.write(hdr)


def cap_address_space(headroom_mb: int) -> None:
    """In a child: allow this much more address space than mapped now, so that a runaway
    allocation fails (MemoryError) instead of taking the machine's memory."""
    import resource
    with open("/proc/self/status") as f:
        vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize"))
    limit = (vm_kb * 1024) + headroom_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))


_MEASURE = r'''
import json, resource, subprocess, sys, time
code, timeout = sys.argv[1], float(sys.argv[2])
t0 = time.monotonic()
try:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=timeout)
    rc, out, err = p.returncode, p.stdout, p.stderr
except subprocess.TimeoutExpired as e:
    rc, out, err = "timeout", e.stdout or b"", e.stderr or b""
print(json.dumps({"rc": rc, "seconds": time.monotonic() - t0,
                  "peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "out": out.decode("utf-8", "replace"),
                  "err": err.decode("utf-8", "replace")[-4000:]}))
'''


def run_measured(code: str, timeout: float = 120) -> dict:
    """Run `code` in a fresh Python (repository on its path) and return its exit status `rc`
    ("timeout" when killed after `timeout` s), wall `seconds`, peak resident memory `peak_mb`
    (its own: measured from a parent that runs nothing else), and `result`: the JSON it printed
    on a line starting with RESULT (None if none)."""
    import json
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", _MEASURE, code, str(timeout)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout + 60)
    m = json.loads(p.stdout.strip().splitlines()[-1])
    lines = [x for x in m["out"].splitlines() if x.startswith("RESULT ")]
    m["result"] = json.loads(lines[-1][len("RESULT "):]) if lines else None
    return m


def bad_counts_after_resume(cfg: PretrainConfig, k: int) -> dict[str, int]:
    """Bad-sample counts after k batches, a save, a new loader resumed from it and two more
    batches: what an uninterrupted loader shows after k + 2 when faults are counted once."""
    from megatron_style.data.loader import build_train_loader
    first = build_train_loader(cfg, 0, 1, StandInProcessor(cfg))
    it = iter(first)
    for _ in range(k):
        next(it)
    again = build_train_loader(cfg, 0, 1, StandInProcessor(cfg))
    again.load_state_dict(first.state_dict())
    it = iter(again)
    next(it)
    next(it)
    return again.bad_sample_counts()
