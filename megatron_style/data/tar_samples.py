"""Reading one shard: tar members checked before they are read, grouped by key (webdataset's
group_by_keys), and a grouped sample turned into a `RawSample` of the stream's kind.

The layout is webdataset's (and img2dataset's): the members of a sample share a key,
`KEY.jpg` (or .jpeg/.png/.webp) for the image, `KEY.txt` for the caption or document,
`KEY.json` for metadata (ignored here).

Why our own member loop rather than webdataset's tar_file_iterator: that one reads every
regular member's data whatever its header claims, so a 10 KB tar whose GNU-sparse member claims
1 GiB is read as 1 GiB of zeros (and then tokenized). Here a member is judged by its header
first (`ReadLimits`): sparse, link, device or oversized members are skipped unread, counted,
and drop the sample they belong to. A shard that cannot be opened, breaks off, stalls or whose
command fails is counted, never raised: the next shard is read.
"""
from __future__ import annotations

import dataclasses
import io
import re
import tarfile
import warnings
from typing import Any, Iterator, Optional

from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys

from megatron_style.data.bad_data import (BAD_IMAGE, BAD_TAR_MEMBER, BAD_TEXT, BAD_UTF8,
                                          EMPTY_TEXT, IMAGE_TOO_LARGE, MEMBER_TOO_LARGE,
                                          MISSING_IMAGE, MISSING_TEXT, SPARSE_MEMBER,
                                          SPECIAL_MEMBER, TRUNCATED_TAR, UNREADABLE_SHARD,
                                          BadDataCounter)
from megatron_style.data.errors import BadSample
from megatron_style.data.raw import RawSample
from megatron_style.data.shard_io import open_shard

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
#: What an image member may be, whatever its extension. Pillow identifies ~40 formats by their
#: bytes (EPS among them, which runs Ghostscript); shards from the web hold these three.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
TEXT_EXT = "txt"
#: webdataset's convention: names like __key__ or __meta__/... are metadata, not sample members.
_META = re.compile(r"__[^/]*__($|/)")


@dataclasses.dataclass(frozen=True)
class ReadLimits:
    """What a shard's content may cost before it is skipped; defaults = DataConfig's."""

    max_member_bytes: int = 64 * 2**20
    max_image_pixels: int = 64_000_000
    read_timeout_s: float = 300.0

    @classmethod
    def from_config(cls, data) -> "ReadLimits":
        return cls(data.max_member_bytes, data.max_image_pixels, data.read_timeout_s)


def read_shard(url: str, bad: BadDataCounter,
               limits: Optional[ReadLimits] = None) -> Iterator[dict[str, Any]]:
    """The samples of one shard in tar order: dicts of member bytes by extension plus `__key__`
    and `__url__`. A shard that cannot be opened yields nothing; one that breaks off (or
    stalls) yields the samples read before the break, without the one whose member was being
    read (its other members may be missing). Both are counted in `bad`, once per shard; so is
    a command that exits with a failure status after its data. A break exactly between two tar
    headers looks like a normal end to Python's tarfile and cannot be noticed here."""
    limits = limits or ReadLimits()
    try:
        stream = open_shard(url, limits.read_timeout_s)
    except Exception as e:  # missing file, command that cannot start
        bad.add(UNREADABLE_SHARD, f"{url}: {e}")
        return
    reading = _ShardReading(url, bad, limits)

    def skip_bad_member(exn: Exception) -> bool:
        bad.add(BAD_TAR_MEMBER, f"{url}: {exn}")
        return True

    done = False
    try:
        yield from group_by_keys(reading.members(stream), handler=skip_bad_member)
        done = True
    finally:
        # Read to its end: check the command's exit status. Given up early (the consumer
        # stopped, or the shard already broke off): just end the command.
        try:
            stream.close(check=done and not reading.faulted)
        except Exception as e:
            if done and not reading.faulted:
                bad.add(UNREADABLE_SHARD, f"{url}: {e}")


class _ShardReading:
    """The member loop of one shard; `faulted` once the shard's break has been counted."""

    def __init__(self, url: str, bad: BadDataCounter, limits: ReadLimits) -> None:
        self.url, self.bad, self.limits = url, bad, limits
        self.faulted = False

    def members(self, stream) -> Iterator[dict[str, Any]]:
        url = self.url
        reading: Optional[str] = None  # the member whose data is being read
        last: Optional[str] = None     # the last member given out
        marked: Optional[str] = None   # the last key dropped for a rejected member
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
            for info in tar:
                tar.members = []  # stream mode keeps every header otherwise
                if _is_meta(info.name) or info.isdir():
                    continue
                why = self.rejected(info)
                if why is not None:
                    self.bad.add(why[0], f"{url}/{info.name}: {why[1]}")
                    key = base_plus_ext(info.name)[0]
                    if key is not None and key != marked:
                        marked = key  # group_by_keys drops a sample that carries "__bad__"
                        yield {"fname": f"{key}.__bad__", "data": True, "__url__": url}
                    continue
                reading = info.name
                data = tar.extractfile(info).read()
                last = info.name
                yield {"fname": info.name, "data": data, "__url__": url}
        except Exception as e:  # tarfile.ReadError, EOFError, zlib/gzip errors, OSError, timeout
            self.faulted = True
            if last is None:
                self.bad.add(UNREADABLE_SHARD, f"{url}: {e}")
                return
            self.bad.add(TRUNCATED_TAR, f"{url}: {e}")
            if reading is not None and reading != last and \
                    base_plus_ext(reading)[0] == base_plus_ext(last)[0]:
                # The break came inside a later member of the sample being grouped: drop that
                # sample. A break inside the first member of the next sample leaves the
                # previous one whole.
                yield {"fname": f"{base_plus_ext(last)[0]}.__bad__", "data": True, "__url__": url}

    def rejected(self, info: tarfile.TarInfo) -> Optional[tuple[str, str]]:
        """(reason, detail) when the member must not be read, judged from its header alone."""
        if info.issparse():  # its size is what it expands to, not what the tar holds
            return SPARSE_MEMBER, f"GNU sparse member expanding to {info.size} bytes"
        if not info.isreg():
            return SPECIAL_MEMBER, f"not a regular file (tar type {info.type!r})"
        if info.size > self.limits.max_member_bytes:
            return MEMBER_TOO_LARGE, (f"{info.size} bytes, more than data.max_member_bytes="
                                      f"{self.limits.max_member_bytes}")
        return None


def _is_meta(name: str) -> bool:
    return "/" not in name and name.startswith("__") and name.endswith("__") or \
        bool(_META.match(name))


def to_raw(kind: str, sample: dict[str, Any], limits: Optional[ReadLimits] = None) -> RawSample:
    """A grouped tar sample as a RawSample of `kind`, or BadSample naming what is wrong: any
    error while decoding one sample's bytes is that sample's fault, counted, never raised.
    The image is opened lazily (header only): the processor decodes it, at a reduced scale when
    the crop allows (PIL's draft mode works only before decoding), which is also why
    webdataset's eager image decoder is not used here."""
    limits = limits or ReadLimits()
    source = f"{sample.get('__url__', '?')}/{sample.get('__key__', '?')}"
    image = text = None
    if kind in ("image", "pair"):
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise BadSample(MISSING_IMAGE, f"no .{'/.'.join(IMAGE_EXTS)} member", source)
    if kind in ("text", "pair"):
        if TEXT_EXT not in sample:
            raise BadSample(MISSING_TEXT, "no .txt member", source)
        text = decode_text(sample[TEXT_EXT], source)
    if kind in ("image", "pair"):
        image = open_image(sample[ext], source, limits.max_image_pixels)
    return RawSample(kind=kind, image=image, text=text, source=source)


def decode_text(data: bytes, source: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample(BAD_UTF8, str(e), source) from None
    except Exception as e:  # MemoryError, a member that is not bytes
        raise BadSample(BAD_TEXT, f"cannot decode: {type(e).__name__}: {e}", source) from None
    text = text.strip()
    if not text:
        raise BadSample(EMPTY_TEXT, "", source)
    return text


def open_image(data: bytes, source: str, max_pixels: int = ReadLimits.max_image_pixels
               ) -> Image.Image:
    """The image, opened but not decoded: JPEG, PNG or WebP only, at most `max_pixels` by its
    header. BadSample("image_too_large") or ("bad_image") otherwise."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; here that is a sample too large, not a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadSample(IMAGE_TOO_LARGE, str(e), source) from None
    except Exception as e:  # not one of IMAGE_FORMATS, or anything a header parser raises
        raise BadSample(BAD_IMAGE, f"cannot open as {'/'.join(IMAGE_FORMATS)}: "
                        f"{type(e).__name__}: {e}", source) from None
    w, h = img.size
    if w * h > max_pixels:
        raise BadSample(IMAGE_TOO_LARGE, f"{w}x{h} = {w * h} pixels, more than "
                        f"data.max_image_pixels={max_pixels}", source)
    return img
