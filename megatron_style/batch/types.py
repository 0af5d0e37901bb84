"""The data<->model contract: what a processed sample is (`Sample`), what a packed batch holds
(`PackedBatch`), how tokens are grouped by expert (`Route`), and the ids both sides share.

A batch is a list of samples laid end to end, with no padding:

    [CLS p1 .. pP][t1 .. tn][CLS p1 .. pP t1 .. tm][CLS p1 .. pP] ...
     image-only    text-only  pair                  image-only

`cu_seqlens` marks where each sample starts, so attention stays inside a sample; every token
carries its modality, so each layer's FFN sends it to its expert (vision, language, or, in the
top layers, vision-language for all tokens of a pair). pack.py derives all of it on the CPU in
the data loader, so the forward pass never waits on the host; validate.py checks it.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_style.config import STREAMS

# Experts (also the modality ids of tokens): vision, language, vision-language.
VISION, LANGUAGE, VL = 0, 1, 2


class Kind(enum.IntEnum):
    """What a sample is; its value is the id in `PackedBatch.sample_kind`, its lower-case name
    the stream it comes from (config.STREAMS, spelled once)."""

    IMAGE = 0
    TEXT = 1
    PAIR = 2


KIND_IMAGE, KIND_TEXT, KIND_PAIR = Kind.IMAGE, Kind.TEXT, Kind.PAIR
KIND_NAMES: tuple[str, ...] = STREAMS
assert KIND_NAMES == tuple(k.name.lower() for k in Kind)
# Streams that losses and accuracies are reported for.
TARGET_STREAMS = ("image", "text", "pair_image", "pair_text")
S_IMAGE, S_TEXT, S_PAIR_IMAGE, S_PAIR_TEXT = range(4)
# Text positions count from 2 (fairseq convention, kept for checkpoint compatibility);
# image tokens use positions 2 (CLS) .. P + 2.
POSITION_OFFSET = 2


@dataclass
class Route:
    """How tokens are grouped by expert: `perm` lists stream positions sorted by expert
    (stable), `inv` maps back, `counts` (host ints) says how many tokens each expert gets."""

    perm: torch.Tensor
    inv: torch.Tensor
    counts: tuple[int, ...]

    @staticmethod
    def from_expert_ids(expert: torch.Tensor, num_experts: int) -> "Route":
        expert = expert.long()
        counts = torch.bincount(expert, minlength=num_experts).tolist()
        if len(counts) > num_experts:
            raise ValueError(f"expert id {len(counts) - 1} out of range for {num_experts} experts")
        perm = torch.sort(expert, stable=True).indices
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return Route(perm, inv, tuple(counts))

    @property
    def trivial(self) -> bool:
        """All tokens with one expert: sorting is the identity and can be skipped."""
        return max(self.counts, default=0) == sum(self.counts)

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.trivial else x.index_select(0, self.perm)

    def unsort(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.trivial else x.index_select(0, self.inv)

    def to(self, device, non_blocking: bool = False) -> "Route":
        return Route(self.perm.to(device, non_blocking=non_blocking),
                     self.inv.to(device, non_blocking=non_blocking), self.counts)


@dataclass
class Sample:
    """One masked sample before packing. An image, a text, or both (a pair)."""

    image: Optional[torch.Tensor] = None          # [C, H, W] float, normalised
    image_mask: Optional[torch.Tensor] = None     # [P] bool, True = patch hidden
    image_targets: Optional[torch.Tensor] = None  # [P] long visual ids, or [P, patch_dim] pixels
    text: Optional[torch.Tensor] = None           # [L] long input ids (masked ones replaced)
    text_mask: Optional[torch.Tensor] = None      # [L] bool, True = token hidden
    text_targets: Optional[torch.Tensor] = None   # [L] long original ids
    # The same crop at the visual tokenizer's resolution (e.g. 256px for VQ-KD's patch 16 when
    # the model uses patch 14 at 224px), when it differs from the model's input.
    tokenizer_image: Optional[torch.Tensor] = None
    source: str = ""                              # shard/key, for logs about bad batches

    @property
    def kind(self) -> int:
        if self.image is not None and self.text is not None:
            return KIND_PAIR
        if self.image is not None:
            return KIND_IMAGE
        if self.text is not None:
            return KIND_TEXT
        raise ValueError("a sample needs an image, a text, or both")


@dataclass
class PackedBatch:
    # inputs
    images: torch.Tensor          # [n_img, C, H, W]
    image_mask: torch.Tensor      # [n_img, P] bool
    text_ids: torch.Tensor        # [n_text_tokens] long
    text_pos: torch.Tensor        # [n_text_tokens] long, rows of the text position table
    # layout of the stream (T tokens, S samples)
    token_source: torch.Tensor    # [T] long: row of cat(image tokens [n_img*(P+1)], text tokens)
    token_sample: torch.Tensor    # [T] long: sample of each token (per-sample drop path)
    cu_seqlens: torch.Tensor      # [S+1] int32
    max_seqlen: int
    sample_kind: torch.Tensor     # [S] long: KIND_*
    route: Route                  # by modality (vision / language)
    route_vl: Route               # by expert in VL layers (vision / language / vision-language)
    # masked data modeling targets
    image_target_pos: torch.Tensor     # [Mi] long stream positions of hidden patches
    image_targets: torch.Tensor        # [Mi] long ids, or [Mi, patch_dim] float pixels
    image_target_stream: torch.Tensor  # [Mi] long: S_IMAGE or S_PAIR_IMAGE
    text_target_pos: torch.Tensor      # [Mt] long
    text_targets: torch.Tensor         # [Mt] long
    text_target_stream: torch.Tensor   # [Mt] long: S_TEXT or S_PAIR_TEXT
    sources: list[str] = field(default_factory=list)
    # Images for the visual tokenizer when they differ from `images` (see Sample).
    tokenizer_images: Optional[torch.Tensor] = None
    # True while the visual targets still have to be computed by the visual tokenizer, which
    # runs on the training device (VQ-KD is a ViT-B): see `with_image_targets`.
    image_targets_pending: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.token_source.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.sample_kind.shape[0])

    def kind_counts(self) -> dict[str, int]:
        c = torch.bincount(self.sample_kind.cpu(), minlength=3).tolist()
        return dict(zip(KIND_NAMES, c))

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (torch.Tensor, Route)):
                v = v.to(device, non_blocking=non_blocking)
            out[f.name] = v
        return PackedBatch(**out)

    def pin_memory(self) -> "PackedBatch":
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.pin_memory()
            elif isinstance(v, Route):
                v = Route(v.perm.pin_memory(), v.inv.pin_memory(), v.counts)
            out[f.name] = v
        return PackedBatch(**out)

    def with_image_targets(self, per_patch: torch.Tensor) -> "PackedBatch":
        """Fill the visual targets from the tokenizer's output for every patch of every image
        ([n_img, P] ids or [n_img, P, patch_dim] pixels): the hidden patches' rows are kept,
        in the order of `image_target_pos`."""
        n, P = self.image_mask.shape
        if tuple(per_patch.shape[:2]) != (n, P):
            raise ValueError(f"visual tokenizer output has shape {tuple(per_patch.shape)}, "
                             f"expected ({n}, {P}, ...) for {n} images of {P} patches")
        targets = per_patch[self.image_mask]
        return dataclasses.replace(self, image_targets=targets, image_targets_pending=False)
