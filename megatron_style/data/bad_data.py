"""Counting and reporting the samples that streaming skips.

Bad data never stops a run: a broken JPEG, an empty caption, a pair without its image, a
truncated, unreadable or stalled shard, a tar member whose header claims too much, an image
whose header claims too many pixels is skipped, counted by a short fixed reason, and reported
(a log line for the first few of each reason, then `TrainLoader.bad_sample_counts()` for
TensorBoard). Reasons raised by the sample processor (`BadSample.reason`, e.g.
"image_too_small") are counted the same way. What does stop a run is a data set that is mostly
bad (`BadFraction`): more than data.max_bad_fraction of a stream's recent samples.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Mapping

log = logging.getLogger("megatron_style.data")

# Reasons found while reading shards. The image/text ones match what the processor uses for
# the same fault (megatron_style/data/transforms.py), so one fault has one name in the logs.
BAD_IMAGE = "bad_image"                # the image member cannot be opened or decoded
BAD_UTF8 = "bad_utf8"                  # the text member is not UTF-8
EMPTY_TEXT = "empty_text"              # the text member is empty or only whitespace
MISSING_IMAGE = "missing_image"        # no .jpg/.jpeg/.png/.webp member (image and pair streams)
MISSING_TEXT = "missing_text"          # no .txt member (text and pair streams)
TRUNCATED_TAR = "truncated_tar"        # a shard ends or breaks in the middle of a member
UNREADABLE_SHARD = "unreadable_shard"  # a shard cannot be opened or is not a tar at all
BAD_TAR_MEMBER = "bad_tar_member"      # e.g. the same member name twice in one sample
# Judged from a member's tar header, before its data is read (the sample it belongs to is
# dropped with it, counted once here):
MEMBER_TOO_LARGE = "member_too_large"  # claims more than data.max_member_bytes
SPARSE_MEMBER = "sparse_member"        # GNU sparse: a tiny tar member expanding to any size
SPECIAL_MEMBER = "special_member"      # a link, device or fifo, not a regular file
IMAGE_TOO_LARGE = "image_too_large"    # more pixels than data.max_image_pixels (by its header)
BAD_TEXT = "bad_text"                  # a text member that cannot be decoded or tokenized
# Texts longer than model.max_text_len tokens are cut, not skipped: no reason for them.

#: Log the first this-many skipped samples of each reason per worker, then every `LOG_EVERY`th.
LOG_FIRST = 3
LOG_EVERY = 1000


class BadDataCounter:
    """Cumulative counts per reason for one loader worker; part of the worker's state."""

    def __init__(self, counts: Mapping[str, int] | None = None, where: str = "") -> None:
        self.counts: Counter[str] = Counter(dict(counts or {}))
        self.where = where
        # While a resumed reader re-reads what it had already read before the checkpoint, the
        # faults it meets were counted then (they are in the restored counts): do not recount.
        self.muted = False
        self.added = 0  # faults counted by this object (not restored ones): for BadFraction

    def add(self, reason: str, detail: str = "") -> None:
        if self.muted:
            return
        self.added += 1
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= LOG_FIRST or n % LOG_EVERY == 0:
            log.warning("skipped bad sample #%d (%s)%s: %s", n, reason,
                        f" in {self.where}" if self.where else "", detail)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def sum_counts(parts: list[Mapping[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for p in parts:
        total.update(p)
    return dict(sorted(total.items()))


class BadFraction:
    """Good/bad outcomes of one stream's last `window` samples on one loader worker; `record`
    raises once more than `max_fraction` of them were bad. Not part of the saved state: after a
    resume the window starts empty (the rule stops broken data, it does not order samples)."""

    def __init__(self, stream: str, window: int, max_fraction: float) -> None:
        self.stream, self.window, self.max_fraction = stream, max(1, window), max_fraction
        self._ring = bytearray(self.window)  # 1 = bad, in arrival order, oldest overwritten
        self._next = 0
        self.bad = 0

    def record(self, bad: bool, counts: Mapping[str, int], last: str = "") -> None:
        old = self._ring[self._next]
        self._ring[self._next] = int(bad)
        self._next = (self._next + 1) % self.window
        self.bad += int(bad) - old
        if bad and self.bad > self.max_fraction * self.window:
            raise RuntimeError(
                f"stream {self.stream!r}: {self.bad} of the last {self.window} samples were bad, "
                f"more than data.max_bad_fraction={self.max_fraction} of "
                f"data.bad_sample_window={self.window}: the data set looks broken (last: {last}); "
                f"bad data so far: {dict(sorted(counts.items()))}")
