"""Errors raised while turning one raw sample into a training sample.

The streaming side catches `BadSample`, counts it by `reason`, logs `source` and moves on to the
next sample: one broken JPEG or an empty caption in a billion-sample shard set must not stop a
run. Whatever goes wrong while decoding one sample's bytes (Pillow, UTF-8, SentencePiece, of
any exception type) is turned into a BadSample where the decoding happens (tar_samples.py,
transforms.py, text_tokenizer.py). Everything else (a bad configuration, a missing tokenizer
file) is a real error, checked at start-up where it can be, and raises something else.
"""
from __future__ import annotations


class BadSample(ValueError):
    """One sample cannot be used. `reason` is a short fixed key for counting
    (e.g. "empty_text", "bad_utf8", "bad_image", "image_too_small"); `detail` says more."""

    def __init__(self, reason: str, detail: str = "", source: str = ""):
        self.reason = reason
        self.detail = detail
        self.source = source
        msg = reason if not detail else f"{reason}: {detail}"
        super().__init__(f"{msg} ({source})" if source else msg)
