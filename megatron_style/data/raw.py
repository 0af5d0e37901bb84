"""A decoded sample as it comes out of a source (webdataset shards or the demo generator),
before augmentation, tokenization and masking turn it into a model `Sample`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from PIL import Image

KINDS = ("image", "text", "pair")


@dataclass
class RawSample:
    kind: str                          # "image", "text" or "pair"
    image: Optional[Image.Image]       # decoded RGB image (image and pair)
    text: Optional[str]                # caption or document (text and pair)
    source: str                        # where it came from: "shard.tar/key" or "demo/pair/123"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"sample kind {self.kind!r} is not one of {KINDS}")
        if self.kind in ("image", "pair") and self.image is None:
            raise ValueError(f"a {self.kind} sample needs an image ({self.source})")
        if self.kind in ("text", "pair") and self.text is None:
            raise ValueError(f"a {self.kind} sample needs a text ({self.source})")
