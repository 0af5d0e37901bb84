"""Counting and reporting the samples that streaming skips.

Bad data never stops a run: a broken JPEG, an empty caption, a pair without its image or a
truncated tar is skipped, counted by a short fixed reason, and reported (a log line for the
first few of each reason, then `TrainLoader.bad_sample_counts()` for TensorBoard). Reasons raised
by the sample processor (`BadSample.reason`, e.g. "image_too_small") are counted the same way.
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

    def add(self, reason: str, detail: str = "") -> None:
        if self.muted:
            return
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
