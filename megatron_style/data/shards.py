"""Finding shards: what `data.<stream>.shards` may say, and the start-up check of data paths.

A shard spec is one of, or a list of any of:
  - a brace pattern, "/data/laion/{00000..00999}.tar" (webdataset's expansion; "::" joins
    several patterns), optionally with shell wildcards "*" / "?";
  - a directory: every .tar / .tar.gz / .tgz file directly inside it, sorted by name;
  - a text file listing shards, one per line ("#" starts a comment); relative lines are taken
    relative to the listing's folder, and a line may itself be a brace pattern;
  - remote URLs, taken as given (brace patterns expanded): "pipe:CMD" (a shell command writing
    the tar to stdout), "http(s)://..." (curl), "s3://..." (the AWS CLI), "gs://..." (the
    Google Cloud CLI); shard_io.py reads them. The tool a scheme needs is checked at start-up.
    Other schemes (hf://, ais://, ...) are refused with what to write instead: a pipe: command.

Shards that a pattern or listing names but that do not exist (lost downloads) are kept in the
list, so that the list, and with it a saved position, stays the same when one disappears: up
to data.max_missing_shards_fraction of a stream's shards a warning says how many, and each is
counted as unreadable_shard when its turn comes; more stop the run at start-up.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import shutil
from typing import Union

from webdataset.shardlists import expand_urls

from megatron_style.config import STREAMS, ConfigError, PretrainConfig
from megatron_style.data.shard_io import PIPE, SCHEMES

log = logging.getLogger("megatron_style.data")

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
REMOTE_PREFIXES = (PIPE, *SCHEMES)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

ACCEPTED = ("give a brace pattern such as /data/shards/{00000..00099}.tar, a directory of .tar "
            "files, a text file listing shards one per line, or a list of these")

ShardSpec = Union[str, list[str]]


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def resolve_shards(spec: ShardSpec, key: str = "shards",
                   max_missing_fraction: float = 0.0) -> list[str]:
    """The shard URLs `spec` names, in order. Raises ConfigError naming `key` and the pattern when
    a pattern matches nothing, a remote scheme cannot be read, or more than
    `max_missing_fraction` of the named local files do not exist (fewer: a warning, and the
    missing ones stay in the list; see the module doc)."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries or all(isinstance(e, str) and not e.strip() for e in entries):
        raise ConfigError(f"{key}: no shards given; {ACCEPTED}")
    urls: list[str] = []
    missing: list[str] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ConfigError(f"{key}: expected strings, got {entry!r}; {ACCEPTED}")
        urls.extend(_resolve_one(entry.strip(), key, allow_listing=True, missing=missing))
    if missing:
        _check_missing(missing, len(urls), key, max_missing_fraction)
    return urls


def _check_missing(missing: list[str], total: int, key: str, max_fraction: float) -> None:
    some = ", ".join(repr(m) for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
    what = f"{key}: {len(missing)} of the {total} shards do not exist ({some})"
    if len(missing) > max_fraction * total:
        raise ConfigError(f"{what}; that is more than data.max_missing_shards_fraction="
                          f"{max_fraction:g} of them: check the pattern's range and that the "
                          "copy is complete, or raise data.max_missing_shards_fraction")
    log.warning("%s; going on without them (each is counted as unreadable_shard when its turn "
                "comes; up to data.max_missing_shards_fraction=%g of them are allowed)",
                what, max_fraction)


def check_scheme(url: str, key: str) -> None:
    """A remote URL must use a scheme we read, with its tool installed (start-up check)."""
    if url.startswith(PIPE):
        return
    for prefix, (tool, install) in SCHEMES.items():
        if url.startswith(prefix):
            if shutil.which(tool) is None:
                raise ConfigError(f"{key}: {url!r} is read with {tool!r}, which is not on PATH; "
                                  f"install {install}, or give the shard as a pipe: command")
            return
    raise ConfigError(f"{key}: {url!r}: the scheme {url.split('://', 1)[0]}:// is not supported; "
                      f"use one of {', '.join(REMOTE_PREFIXES)}, or a pipe: command that writes "
                      "the tar to stdout (e.g. 'pipe:ais get ais://bucket/shard.tar -')")


def _remote(entry: str, key: str) -> list[str]:
    urls = expand_urls(entry)
    for u in urls:
        check_scheme(u, key)
    return urls


def _resolve_one(entry: str, key: str, allow_listing: bool, missing: list[str]) -> list[str]:
    if is_remote(entry) or _SCHEME.match(entry):
        return _remote(entry, key)
    path = os.path.expanduser(entry)
    if os.path.isdir(path):
        found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(TAR_SUFFIXES))
        if not found:
            raise ConfigError(f"{key}: directory {entry!r} has no {'/'.join(TAR_SUFFIXES)} "
                              f"files; {ACCEPTED}")
        return found
    if allow_listing and os.path.isfile(path) and not path.endswith(TAR_SUFFIXES):
        return _read_listing(path, key, missing)
    urls: list[str] = []
    lost: list[str] = []
    found = 0
    expanded = expand_urls(path)
    for url in expanded:
        if any(c in url for c in "*?"):
            matched = sorted(glob.glob(url))
            if not matched:  # a wildcard names no file in particular: nothing to keep
                raise ConfigError(f"{key}: {url!r} (of {entry!r}) matches no shard files; "
                                  f"{ACCEPTED}")
            urls.extend(matched)
            found += len(matched)
        elif os.path.exists(url):
            urls.append(url)
            found += 1
        else:
            urls.append(url)  # kept: see the module doc
            lost.append(url)
    if not found and len(expanded) > 1:  # a pattern naming only lost files is a wrong pattern
        raise ConfigError(f"{key}: {entry!r} matches no shard files; {ACCEPTED}")
    missing.extend(lost)
    return urls


def _read_listing(path: str, key: str, missing: list[str]) -> list[str]:
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
            urls.extend(_resolve_one(line, f"{key} (listed in {path!r})", allow_listing=False,
                                     missing=missing))
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
                found[s] = resolve_shards(st.shards, f"data.{s}.shards",
                                          data.max_missing_shards_fraction)
    tok = data.tokenizer
    if tok.text_model and not os.path.isfile(os.path.expanduser(tok.text_model)):
        raise ConfigError(f"data.tokenizer.text_model: {tok.text_model!r} does not exist; give "
                          "a SentencePiece .model file, or leave it empty to train one on the "
                          "demo corpus")
    if tok.visual_model and not os.path.isfile(os.path.expanduser(tok.visual_model)):
        raise ConfigError(f"data.tokenizer.visual_model: {tok.visual_model!r} does not exist; "
                          f"give the path of the {tok.visual} tokenizer's file")
    return found
