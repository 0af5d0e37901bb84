"""Finding shards: what `data.<stream>.shards` may say, and the start-up check of data paths.

A shard spec is one of, or a list of any of:
  - a brace pattern, "/data/laion/{00000..00999}.tar" (webdataset's expansion; "::" joins
    several patterns), optionally with shell wildcards "*" / "?";
  - a directory: every .tar / .tar.gz / .tgz file directly inside it, sorted by name;
  - a text file listing shards, one per line ("#" starts a comment); relative lines are taken
    relative to the listing's folder, and a line may itself be a brace pattern;
  - remote URLs webdataset can open ("pipe:...", "http(s)://...", "s3://..."), taken as given.
"""
from __future__ import annotations

import glob
import hashlib
import os
from typing import Union

from webdataset.shardlists import expand_urls

from megatron_style.config import STREAMS, ConfigError, PretrainConfig

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://", "ais://")

ACCEPTED = ("give a brace pattern such as /data/shards/{00000..00099}.tar, a directory of .tar "
            "files, a text file listing shards one per line, or a list of these")

ShardSpec = Union[str, list[str]]


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def resolve_shards(spec: ShardSpec, key: str = "shards") -> list[str]:
    """The shard URLs `spec` names, in order. Raises ConfigError naming `key` and the pattern when
    a pattern matches nothing or a named local file does not exist."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries or all(isinstance(e, str) and not e.strip() for e in entries):
        raise ConfigError(f"{key}: no shards given; {ACCEPTED}")
    urls: list[str] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ConfigError(f"{key}: expected strings, got {entry!r}; {ACCEPTED}")
        urls.extend(_resolve_one(entry.strip(), key, allow_listing=True))
    return urls


def _resolve_one(entry: str, key: str, allow_listing: bool) -> list[str]:
    if is_remote(entry):
        return expand_urls(entry)
    path = os.path.expanduser(entry)
    if os.path.isdir(path):
        found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(TAR_SUFFIXES))
        if not found:
            raise ConfigError(f"{key}: directory {entry!r} has no {'/'.join(TAR_SUFFIXES)} "
                              f"files; {ACCEPTED}")
        return found
    if allow_listing and os.path.isfile(path) and not path.endswith(TAR_SUFFIXES):
        return _read_listing(path, key)
    urls: list[str] = []
    missing: list[str] = []
    for url in expand_urls(path):
        if is_remote(url):
            urls.append(url)
        elif any(c in url for c in "*?"):
            matched = sorted(glob.glob(url))
            urls.extend(matched)
            if not matched:
                missing.append(url)
        elif os.path.isfile(url):
            urls.append(url)
        else:
            missing.append(url)
    if not urls:
        raise ConfigError(f"{key}: {entry!r} matches no shard files; {ACCEPTED}")
    if missing:
        some = ", ".join(repr(m) for m in missing[:3])
        raise ConfigError(f"{key}: {len(missing)} of the {len(urls) + len(missing)} shards of "
                          f"{entry!r} do not exist ({some}{', ...' if len(missing) > 3 else ''})")
    return urls


def _read_listing(path: str, key: str) -> list[str]:
    base = os.path.dirname(os.path.abspath(path))
    urls: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if not is_remote(line) and not os.path.isabs(os.path.expanduser(line)):
                line = os.path.join(base, line)
            # One level only: a listing naming another listing is more likely a mistake.
            urls.extend(_resolve_one(line, f"{key} (listed in {path!r})", allow_listing=False))
    if not urls:
        raise ConfigError(f"{key}: the shard listing {path!r} names no shards; {ACCEPTED}")
    return urls


def shard_list_digest(urls: list[str]) -> str:
    """Identifies a shard list in loader state by file names (not folders, so that a data set
    moved to another mount still resumes)."""
    h = hashlib.sha1()
    for u in urls:
        h.update(os.path.basename(u).encode() + b"\n")
    return h.hexdigest()[:16]


def check_data_paths(cfg: PretrainConfig) -> dict[str, list[str]]:
    """Fail at start-up, before any process group exists, when a data path named in the config
    does not exist. Returns the resolved shard URLs of each active stream (empty with demo)."""
    data = cfg.data
    found: dict[str, list[str]] = {}
    if data.source == "shards":
        for s in STREAMS:
            st = getattr(data, s)
            if st.weight > 0:
                found[s] = resolve_shards(st.shards, f"data.{s}.shards")
    tok = data.tokenizer
    if tok.text_model and not os.path.isfile(os.path.expanduser(tok.text_model)):
        raise ConfigError(f"data.tokenizer.text_model: {tok.text_model!r} does not exist; give "
                          "a SentencePiece .model file, or leave it empty to train one on the "
                          "demo corpus")
    if tok.visual_model and not os.path.isfile(os.path.expanduser(tok.visual_model)):
        raise ConfigError(f"data.tokenizer.visual_model: {tok.visual_model!r} does not exist; "
                          f"give the path of the {tok.visual} tokenizer's file")
    return found
