"""The packed multimodal batch: images, texts and image-text pairs in one token stream.

A batch is a list of samples laid end to end, with no padding:

    [CLS p1 .. pP][t1 .. tn][CLS p1 .. pP t1 .. tm][CLS p1 .. pP] ...
     image-only    text-only  pair                  image-only

`cu_seqlens` marks where each sample starts, so attention stays inside a sample; every token
carries its modality, so each layer's FFN sends it to its expert (vision, language, or, in the
top layers, vision-language for all tokens of a pair). Everything derived from the layout
(positions, routing permutations, target positions) is computed here, on the CPU in the data
loader, so the forward pass never waits on the host.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megatron_style.config import ModelConfig

# Experts (also the modality ids of tokens): vision, language, vision-language.
VISION, LANGUAGE, VL = 0, 1, 2
# Kinds of sample.
KIND_IMAGE, KIND_TEXT, KIND_PAIR = 0, 1, 2
KIND_NAMES = ("image", "text", "pair")
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

    def validate(self, cfg: ModelConfig) -> None:
        """Check shapes and packing metadata; raise ValueError naming what is wrong.
        Value checks that need the data are done when the tensors are on the CPU."""
        validate_packed(self, cfg)


def pack_samples(samples: Sequence[Sample], cfg: ModelConfig) -> PackedBatch:
    """Lay samples end to end and derive everything the forward pass needs."""
    if len(samples) == 0:
        raise ValueError("empty batch: pack_samples needs at least one sample")
    P = cfg.num_patches
    n_img_tok = P + 1
    images, image_masks, image_tgts = [], [], []
    text_ids, text_pos, text_src = [], [], []
    token_source, token_sample, token_mod, token_pair = [], [], [], []
    kinds, lens = [], []
    img_tpos, img_tstream, img_tlist = [], [], []
    txt_tpos, txt_tstream, txt_tlist = [], [], []
    n_text_total = 0
    offset = 0
    tok_images: list[torch.Tensor] = []
    pending = False
    image_targets_are_pixels = None
    # Text rows are appended after all image rows in the source table; their base is known
    # only at the end, so record text rows relative and shift them afterwards.
    for s_idx, s in enumerate(samples):
        kind = s.kind
        kinds.append(kind)
        start = offset
        is_pair = kind == KIND_PAIR
        if s.image is not None:
            j = len(images)
            images.append(s.image)
            mask = s.image_mask if s.image_mask is not None else torch.zeros(P, dtype=torch.bool)
            if mask.shape != (P,):
                raise ValueError(f"sample {s_idx}: image_mask has shape {tuple(mask.shape)}, "
                                 f"expected ({P},) for {cfg.img_size}px images with patch "
                                 f"{cfg.patch_size}")
            image_masks.append(mask.bool())
            token_source.append(torch.arange(j * n_img_tok, (j + 1) * n_img_tok))
            token_mod.append(torch.full((n_img_tok,), VISION))
            hidden = mask.nonzero().squeeze(1)
            if s.tokenizer_image is not None:
                tok_images.append(s.tokenizer_image)
            if hidden.numel():
                if s.image_targets is None:
                    pending = True
                else:
                    pix = s.image_targets.dtype.is_floating_point
                    if image_targets_are_pixels is None:
                        image_targets_are_pixels = pix
                    elif image_targets_are_pixels != pix:
                        raise ValueError("a batch mixes visual-token and pixel targets")
                    img_tlist.append(s.image_targets[hidden])
                img_tpos.append(start + 1 + hidden)
                img_tstream.append(torch.full((hidden.numel(),),
                                              S_PAIR_IMAGE if is_pair else S_IMAGE))
            offset += n_img_tok
        if s.text is not None:
            L = int(s.text.shape[0])
            if L == 0:
                raise ValueError(f"sample {s_idx}: empty text")
            text_ids.append(s.text.long())
            text_pos.append(torch.arange(POSITION_OFFSET, POSITION_OFFSET + L))
            text_src.append(torch.arange(n_text_total, n_text_total + L))
            token_source.append(-1 - torch.arange(n_text_total, n_text_total + L))  # fixed below
            token_mod.append(torch.full((L,), LANGUAGE))
            if s.text_mask is not None and bool(s.text_mask.any()):
                if s.text_targets is None:
                    raise ValueError(f"sample {s_idx}: text has hidden tokens but no text_targets")
                hidden = s.text_mask.nonzero().squeeze(1)
                txt_tlist.append(s.text_targets.long()[hidden])
                txt_tpos.append(offset + hidden)
                txt_tstream.append(torch.full((hidden.numel(),), S_PAIR_TEXT if is_pair else S_TEXT))
            n_text_total += L
            offset += L
        length = offset - start
        lens.append(length)
        token_sample.append(torch.full((length,), s_idx))
        token_pair.append(torch.full((length,), is_pair, dtype=torch.bool))

    n_img = len(images)
    if pending and img_tlist:
        raise ValueError("some images come with visual targets and some without")
    if tok_images and len(tok_images) != n_img:
        raise ValueError("some images come with a tokenizer_image and some without")
    src = torch.cat(token_source)
    src = torch.where(src < 0, n_img * n_img_tok + (-1 - src), src)
    modality = torch.cat(token_mod)
    pair = torch.cat(token_pair)
    C, H = cfg.in_chans, cfg.img_size
    imgs = torch.stack(images) if images else torch.zeros(0, C, H, H)
    masks = torch.stack(image_masks) if image_masks else torch.zeros(0, P, dtype=torch.bool)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)

    def cat_or(xs, empty):
        return torch.cat(xs) if xs else empty

    empty_long = torch.zeros(0, dtype=torch.long)
    if image_targets_are_pixels:
        empty_img_t = torch.zeros(0, cfg.patch_dim)
    else:
        empty_img_t = empty_long
    return PackedBatch(
        images=imgs,
        image_mask=masks,
        text_ids=cat_or(text_ids, empty_long),
        text_pos=cat_or(text_pos, empty_long),
        token_source=src,
        token_sample=torch.cat(token_sample),
        cu_seqlens=cu,
        max_seqlen=max(lens),
        sample_kind=torch.tensor(kinds, dtype=torch.long),
        route=Route.from_expert_ids(modality, 2),
        route_vl=Route.from_expert_ids(torch.where(pair, VL, modality), 3),
        image_target_pos=cat_or(img_tpos, empty_long),
        image_targets=cat_or(img_tlist, empty_img_t),
        image_target_stream=cat_or(img_tstream, empty_long),
        text_target_pos=cat_or(txt_tpos, empty_long),
        text_targets=cat_or(txt_tlist, empty_long),
        text_target_stream=cat_or(txt_tstream, empty_long),
        sources=[s.source for s in samples],
        tokenizer_images=torch.stack(tok_images) if tok_images else None,
        image_targets_pending=pending,
    )


def validate_packed(b: PackedBatch, cfg: ModelConfig) -> None:
    P, C, H = cfg.num_patches, cfg.in_chans, cfg.img_size
    S = b.sample_kind.shape[0]
    if S == 0 or b.num_tokens == 0:
        raise ValueError("empty batch: no samples or no tokens")
    if b.images.dim() != 4 or tuple(b.images.shape[1:]) != (C, H, H):
        raise ValueError(f"images have shape {tuple(b.images.shape)}; the model takes "
                         f"[n, {C}, {H}, {H}] ({C} channels at {H}x{H})")
    n_img = b.images.shape[0]
    if tuple(b.image_mask.shape) != (n_img, P):
        raise ValueError(f"image_mask has shape {tuple(b.image_mask.shape)}, expected ({n_img}, {P})")
    nt = b.text_ids.shape[0]
    if b.text_pos.shape != b.text_ids.shape:
        raise ValueError(f"text_pos has shape {tuple(b.text_pos.shape)}, text_ids {tuple(b.text_ids.shape)}")
    T = b.num_tokens
    if n_img * (P + 1) + nt != T:
        raise ValueError(f"inconsistent packing: {n_img} images x {P + 1} tokens + {nt} text "
                         f"tokens = {n_img * (P + 1) + nt}, but the stream has {T} tokens")
    if b.cu_seqlens.shape != (S + 1,):
        raise ValueError(f"inconsistent packing: cu_seqlens has {b.cu_seqlens.shape[0]} entries "
                         f"for {S} samples (expected {S + 1})")
    for name in ("token_sample",):
        if getattr(b, name).shape != (T,):
            raise ValueError(f"inconsistent packing: {name} has shape "
                             f"{tuple(getattr(b, name).shape)}, expected ({T},)")
    for name, r, n in (("route", b.route, 2), ("route_vl", b.route_vl, 3)):
        if len(r.counts) != n or sum(r.counts) != T or r.perm.shape != (T,):
            raise ValueError(f"inconsistent packing: {name} counts {r.counts} do not cover the "
                             f"{T} tokens with {n} experts")
    if b.image_targets_pending:
        raise ValueError("the visual targets of this batch have not been computed yet: run the "
                         "visual tokenizer and batch.with_image_targets(...) before the model")
    if b.image_target_pos.shape[0] != b.image_targets.shape[0]:
        raise ValueError("inconsistent packing: image_target_pos and image_targets differ in length")
    if b.text_target_pos.shape[0] != b.text_targets.shape[0]:
        raise ValueError("inconsistent packing: text_target_pos and text_targets differ in length")
    if b.token_source.is_cuda:
        return  # value checks below would stall the GPU; the loader ran them on the CPU
    cu = b.cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != T or bool((lens <= 0).any()):
        raise ValueError(f"inconsistent packing: cu_seqlens must rise strictly from 0 to {T}, "
                         f"got {cu.tolist()[:8]}{'...' if S > 7 else ''}")
    if int(lens.max()) > b.max_seqlen:
        raise ValueError(f"inconsistent packing: max_seqlen {b.max_seqlen} < longest sample "
                         f"{int(lens.max())}")
    _check_stream_values(b, n_img * (P + 1), lens)
    if nt:
        lo, hi = int(b.text_ids.min()), int(b.text_ids.max())
        if lo < 0 or hi >= cfg.text_vocab_size:
            bad = hi if hi >= cfg.text_vocab_size else lo
            raise ValueError(f"token id {bad} is out of the text vocabulary "
                             f"[0, {cfg.text_vocab_size})")
        if int(b.text_pos.min()) < POSITION_OFFSET:
            raise ValueError(f"inconsistent packing: text_pos counts from {POSITION_OFFSET} "
                             f"(fairseq convention), got {int(b.text_pos.min())}")
        if int(b.text_pos.max()) >= cfg.max_text_len + POSITION_OFFSET:
            raise ValueError(f"a text has {int(b.text_pos.max()) - POSITION_OFFSET + 1} tokens; "
                             f"the position table takes at most max_text_len={cfg.max_text_len}")
    if b.text_targets.numel() and (int(b.text_targets.min()) < 0
                                   or int(b.text_targets.max()) >= cfg.text_vocab_size):
        raise ValueError(f"text target ids must be in [0, {cfg.text_vocab_size})")
    if not b.image_targets.dtype.is_floating_point and b.image_targets.numel():
        if int(b.image_targets.min()) < 0 or int(b.image_targets.max()) >= cfg.visual_vocab_size:
            raise ValueError(f"visual target ids must be in [0, {cfg.visual_vocab_size})")
    for name in ("image_target_pos", "text_target_pos"):
        pos = getattr(b, name)
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= T):
            raise ValueError(f"inconsistent packing: {name} points outside the {T}-token stream")


def _check_stream_values(b: PackedBatch, image_rows: int, lens: torch.Tensor) -> None:
    """The metadata that indexes tensors and routes tokens. Wrong values would fail deep inside
    the forward pass, or worse, silently send tokens to the wrong expert or sample."""
    T, S = b.num_tokens, lens.shape[0]
    src = b.token_source.long()
    if int(src.min()) < 0 or int(src.max()) >= T:
        raise ValueError(f"inconsistent packing: token_source values must be rows 0..{T - 1} of "
                         f"the embedded tokens, got [{int(src.min())}, {int(src.max())}]")
    if not torch.equal(b.token_sample.long(), torch.repeat_interleave(torch.arange(S), lens)):
        raise ValueError("inconsistent packing: token_sample does not number the tokens by the "
                         "samples that cu_seqlens lays out")
    kinds = b.sample_kind.long()
    if int(kinds.min()) < 0 or int(kinds.max()) >= len(KIND_NAMES):
        raise ValueError(f"inconsistent packing: sample_kind values must be in 0..{len(KIND_NAMES) - 1} "
                         f"({', '.join(KIND_NAMES)}), got {kinds.unique().tolist()}")
    vision = src < image_rows
    n_vision = torch.zeros(S, dtype=torch.long).index_add_(0, b.token_sample.long(), vision.long())
    expected_kind = torch.where(n_vision == lens, KIND_IMAGE, torch.where(n_vision == 0, KIND_TEXT, KIND_PAIR))
    if not torch.equal(kinds, expected_kind):
        j = int((kinds != expected_kind).nonzero()[0])
        raise ValueError(f"inconsistent packing: sample {j} is marked {KIND_NAMES[int(kinds[j])]!r} but "
                         f"holds {int(n_vision[j])} image and {int(lens[j] - n_vision[j])} text tokens")
    modality = torch.where(vision, VISION, LANGUAGE)
    for name, r, expert in (("route", b.route, modality),
                            ("route_vl", b.route_vl, torch.where((kinds == KIND_PAIR)[b.token_sample.long()],
                                                                 VL, modality))):
        want = tuple(torch.bincount(expert, minlength=len(r.counts)).tolist())
        if tuple(r.counts) != want:
            raise ValueError(f"inconsistent packing: {name} counts {tuple(r.counts)}, but the stream "
                             f"holds {want} tokens per expert")
        perm, inv = r.perm.long(), r.inv.long()
        ok = (perm.shape == inv.shape == (T,) and int(perm.min()) >= 0 and int(perm.max()) < T
              and int(inv.min()) >= 0 and int(inv.max()) < T)
        ok = ok and torch.equal(inv[perm], torch.arange(T))
        ok = ok and torch.equal(expert[perm], torch.repeat_interleave(torch.arange(len(want)),
                                                                      torch.tensor(want)))
        if not ok:
            raise ValueError(f"inconsistent packing: {name}.perm must list the stream positions "
                             f"sorted by expert and {name}.inv its inverse")
