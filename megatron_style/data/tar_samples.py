"""Reading one shard: webdataset's tar iteration and grouping by key, made fault tolerant, and
turning a grouped sample into a `RawSample` of the stream's kind.

The layout is webdataset's (and img2dataset's): the members of a sample share a key,
`KEY.jpg` (or .jpeg/.png/.webp) for the image, `KEY.txt` for the caption or document,
`KEY.json` for metadata (ignored here).
"""
from __future__ import annotations

import io
from typing import Any, Iterator, Optional

from PIL import Image
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from megatron_style.data.bad_data import (BAD_IMAGE, BAD_TAR_MEMBER, BAD_UTF8, EMPTY_TEXT,
                                          MISSING_IMAGE, MISSING_TEXT, TRUNCATED_TAR,
                                          UNREADABLE_SHARD, BadDataCounter)
from megatron_style.data.errors import BadSample
from megatron_style.data.raw import RawSample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"


def read_shard(url: str, bad: BadDataCounter) -> Iterator[dict[str, Any]]:
    """The samples of one shard in tar order: dicts of member bytes by extension plus `__key__`
    and `__url__`. A shard that cannot be opened yields nothing; one that breaks off yields the
    samples read before the break, without the one whose member was being read (its other
    members may be missing). Both are counted in `bad`. A break exactly between two tar
    headers looks like a normal end to Python's tarfile and cannot be noticed here."""
    try:
        stream = gopen(url)
    except Exception as e:  # missing file, failed pipe: the run goes on with the next shard
        bad.add(UNREADABLE_SHARD, f"{url}: {e}")
        return
    try:
        def skip_bad_member(exn: Exception) -> bool:
            bad.add(BAD_TAR_MEMBER, f"{url}: {exn}")
            return True

        yield from group_by_keys(_members(stream, url, bad), handler=skip_bad_member)
    finally:
        stream.close()


def _members(stream, url: str, bad: BadDataCounter) -> Iterator[dict[str, Any]]:
    reading: list[Optional[str]] = [None]  # the member whose data is being read

    def note(fname: str) -> bool:  # webdataset calls this before reading each member's data
        reading[0] = fname
        return True

    last = None
    try:
        # reraise: webdataset's handlers cannot tell "this member is bad" from "the stream is
        # broken"; a broken stream ends the shard here, counted once.
        for member in tar_file_iterator(stream, handler=reraise_exception, select_files=note):
            member["__url__"] = url
            last = member["fname"]
            yield member
    except Exception as e:  # tarfile.ReadError, EOFError, zlib/gzip errors, OSError
        if last is None:
            bad.add(UNREADABLE_SHARD, f"{url}: {e}")
            return
        bad.add(TRUNCATED_TAR, f"{url}: {e}")
        broken = reading[0]
        if broken is not None and broken != last and \
                base_plus_ext(broken)[0] == base_plus_ext(last)[0]:
            # The break came inside a later member of the sample being grouped: drop that
            # sample (group_by_keys drops one that carries "__bad__"). A break inside the first
            # member of the next sample leaves the previous one whole.
            yield {"fname": f"{base_plus_ext(last)[0]}.__bad__", "data": True, "__url__": url}


def to_raw(kind: str, sample: dict[str, Any]) -> RawSample:
    """A grouped tar sample as a RawSample of `kind`, or BadSample naming what is wrong.
    The image is opened lazily (header only): the processor decodes it, at a reduced scale when
    the crop allows (PIL's draft mode works only before decoding), which is also why
    webdataset's eager image decoder is not used here."""
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
        image = open_image(sample[ext], source)
    return RawSample(kind=kind, image=image, text=text, source=source)


def decode_text(data: bytes, source: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample(BAD_UTF8, str(e), source) from None
    text = text.strip()
    if not text:
        raise BadSample(EMPTY_TEXT, "", source)
    return text


def open_image(data: bytes, source: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadSample(BAD_IMAGE, f"cannot open: {e}", source) from None
