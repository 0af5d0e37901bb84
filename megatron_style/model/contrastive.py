"""Image-text contrastive learning (ITC): BEiT-3's dual encoder for retrieval, VLMo's ITC.

    image alone -> V experts -> CLS -> final vision norm   -> vision_head   -> L2-normalise
    text alone  -> L experts -> CLS -> final language norm -> language_head -> L2-normalise
    loss = (CE(s * I T^T) + CE(s * T I^T)) / 2,  s = exp(logit_scale) clamped at 100

as in unilm's BEiT3ForRetrieval (bias-free Linear(D, D) heads, logit_scale initialised to
log(1/0.07), as CLIP) and open_clip's ClipLoss. The two inputs are the views of a packed
batch's pairs (batch.dual_encoder_views): an image-only batch routes every token to the vision
experts and a text-only batch to the language experts by construction of the packed layout,
so `MultiwayTransformer.encode` is the dual encoder as it is.

`ContrastiveModel` (encoder + `itc` heads) is the released retrieval model; its state dict is
`beit3.*` + `itc.{vision_head.weight, language_head.weight, logit_scale}`, which
released_checkpoint.py maps to and from unilm's top-level names. Any model holding a
ContrastiveHeads at attribute `itc` (e.g. a masked-data model with ITC added) gets the same
mapping.

Data parallelism: `contrastive_loss` takes the data-parallel process group and uses every
rank's pairs as negatives (the invariants are in its docstring). Under tensor parallelism the
features are replicated within a tensor group (the encoder's outputs are, and the heads are
plain replicated Linears), so the gather must run over the data-parallel group only: over the
whole world, each pair would appear once per tensor rank, its copies as false negatives.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron_style.batch import KIND_IMAGE, KIND_TEXT, LANGUAGE, VISION, PackedBatch
from megatron_style.config import ModelConfig
from megatron_style.model.init import init_rule
from megatron_style.model.transformer import MultiwayTransformer
from megatron_style.parallel.layers import init_trunc_normal_
from megatron_style.parallel.mappings import TPGroup

LOGIT_SCALE_INIT = math.log(1 / 0.07)   # CLIP's temperature 0.07, as unilm's BEiT-3
MAX_SCALE = 100.0                       # exp(logit_scale) is clamped here (CLIP, open_clip)


class ContrastiveHeads(nn.Module):
    """unilm BEiT3ForRetrieval's heads: `vision_head`, `language_head` (Linear(D, D), no
    bias) and the scalar `logit_scale`. The head matrices are drawn with the model's init
    rule (model/init.py: trunc-normal std, cut), as every other matrix of the model; unilm
    draws them with trunc-normal std 0.02 cut at +-1 std, which is the `beit` rule."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, rule = cfg.dim, init_rule(cfg)
        self.vision_head = nn.Linear(D, D, bias=False)
        self.language_head = nn.Linear(D, D, bias=False)
        with torch.no_grad():
            init_trunc_normal_(self.vision_head.weight, rule.std, rule.cut)
            init_trunc_normal_(self.language_head.weight, rule.std, rule.cut)
        # Shape [1], not unilm's 0-d: DeepSpeed broadcasts every parameter as a byte view at
        # start-up, which a 0-d tensor cannot give. The released layout's 0-d value is
        # reshaped on the way in and out (released_checkpoint.py). ndim < 2: never decayed.
        self.logit_scale = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT))

    def image_features(self, cls: torch.Tensor) -> torch.Tensor:
        """[n, D] unit vectors from the images' CLS states (after the final vision norm)."""
        return F.normalize(self.vision_head(cls), dim=-1)

    def text_features(self, cls: torch.Tensor) -> torch.Tensor:
        """[n, D] unit vectors from the texts' CLS states (after the final language norm)."""
        return F.normalize(self.language_head(cls), dim=-1)


def cls_states(beit3: MultiwayTransformer, b: PackedBatch, modality: int) -> torch.Tensor:
    """[S, D]: the first token of each sample of a one-kind batch (image-only for VISION,
    text-only for LANGUAGE) after the encoder and its final norm of that modality. An image's
    first token is its CLS; a text's is its first token (`<s>` in the released tokenizer), as
    BEiT3ForRetrieval takes `encoder_out[:, 0]`. Only those rows are normalised."""
    want = {VISION: KIND_IMAGE, LANGUAGE: KIND_TEXT}[modality]
    # On a GPU batch this check would stall the device; the views are built one kind each.
    if not b.sample_kind.is_cuda and bool((b.sample_kind != int(want)).any()):
        raise ValueError(f"cls_states({'VISION' if modality == VISION else 'LANGUAGE'}) needs "
                         f"a batch of {'images' if modality == VISION else 'texts'} only "
                         f"(batch.dual_encoder_views); got kinds {b.kind_counts()}")
    h = beit3.encode(b, final_norm=False)
    return beit3.norm_by_modality(h.index_select(0, b.cu_seqlens[:-1].long()), modality)


def dual_encoder_features(model, images: PackedBatch,
                          texts: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, D], [n, D]) unit vectors of the images of `images` and the texts of `texts`
    (one-kind views), through any model holding the encoder at `beit3` and ContrastiveHeads
    at `itc` (ContrastiveModel, MaskedDataModel with ITC)."""
    return (model.itc.image_features(cls_states(model.beit3, images, VISION)),
            model.itc.text_features(cls_states(model.beit3, texts, LANGUAGE)))


class ContrastiveOutput(NamedTuple):
    # NamedTuple for the same reason as MDMOutput (ZeRO-3 sees inside it).
    loss: torch.Tensor    # scalar: this rank's share (see contrastive_loss)
    # [4] detached, additive over ranks: (sum over local pairs of the symmetric loss,
    # image->text top-1 correct, text->image top-1 correct, local pairs)
    stats: torch.Tensor
    scale: torch.Tensor   # detached scalar: the temperature multiplier used, exp(logit_scale) <= 100
    candidates: int       # pairs in the union over the group: each query ranks this many
    # Detached [candidates, 2D]: every rank's image features then text features (the rows
    # the loss ranked against), and where this rank's rows start; ITM samples its hard
    # negatives from them (model/matching.py).
    gathered: Optional[torch.Tensor] = None
    offset: int = 0

    @property
    def i2t_acc(self) -> float:
        return float(self.stats[1]) / max(1.0, float(self.stats[3]))

    @property
    def t2i_acc(self) -> float:
        return float(self.stats[2]) / max(1.0, float(self.stats[3]))

    def metrics(self, stats: Optional[torch.Tensor] = None) -> dict[str, float]:
        """Loss and top-1 accuracies of the local pairs, or of all ranks' when given `stats`
        summed over the data-parallel group (all_reduce SUM of `self.stats`)."""
        s = (self.stats if stats is None else stats).double().cpu()
        n = float(s[3])
        out = {"itc/scale": float(self.scale), "itc/candidates": float(self.candidates)}
        if n > 0:
            out.update({"loss/itc": float(s[0]) / n, "acc/itc_i2t": float(s[1]) / n,
                        "acc/itc_t2i": float(s[2]) / n})
        return out


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows, concatenated in rank order (padded to the longest for the
    collective, then cut back). Backward: the gradient of the whole result summed over the
    ranks (all_reduce SUM), then this rank's slice: each rank's loss depends on every rank's
    rows, so the gradient of a row is the sum of what every rank's loss sends it.

    An all_reduce of [N, width] rather than a reduce_scatter: gloo has no reduce_scatter for
    unequal slices, and the features are small next to the encoder's activations."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        m = max(sizes)
        padded = x.new_zeros(m, *x.shape[1:])
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        start = sum(ctx.sizes[:ctx.rank])
        return g[start:start + ctx.sizes[ctx.rank]], None, None, None


def gather_rows(x: torch.Tensor, group,
                sizes: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, int, Sequence[int]]:
    """(rows of every rank of `group` in rank order, with gradients back to the local rows;
    where this rank's rows start; every rank's row count). Ranks may hold different numbers of
    rows (0 included): the counts are gathered first (one small collective and a host sync),
    unless the caller knows them already (`sizes`, every rank's, in rank order)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if sizes is None:
        n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        counts = [torch.empty_like(n) for _ in range(world)]
        dist.all_gather(counts, n, group=group)
        sizes = tuple(int(c) for c in counts)
    sizes = tuple(sizes)
    if len(sizes) != world or sizes[rank] != x.shape[0]:
        raise ValueError(f"row counts {sizes} do not fit a group of {world} ranks where this "
                         f"rank (rank {rank}) holds {x.shape[0]} rows")
    if sum(sizes) == 0:
        raise ValueError("no rank of the group holds a pair: the contrastive loss is empty")
    return _GatherRows.apply(x, group, sizes, rank), sum(sizes[:rank]), sizes


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                     group: Optional[dist.ProcessGroup] = None) -> ContrastiveOutput:
    """Symmetric InfoNCE over the pairs of every rank of `group` (None: this process's pairs
    only). `img`, `txt`: [n, D] L2-normalised features, row i of each from pair i (n may differ
    between ranks, and be 0). Logits are computed in fp32: s * img @ txt_all^T for the local
    images against every text of the group and s * txt @ img_all^T the other way, with
    s = exp(logit_scale) clamped at MAX_SCALE (100; above it the clamp passes no gradient to
    logit_scale); the positives of rank r's rows are at offset sum(n_0 .. n_{r-1}).

    Invariants, with W ranks in `group` and N pairs in their union (tested against one process
    on the union batch, tests/parallel/test_contrastive_ranks.py):
      * the loss returned on rank r is  W / N * (sum over its pairs of
        (CE_i2t + CE_t2i) / 2),  so that the MEAN over the W ranks equals the one-process loss
        on the union;
      * after backward on every rank, the gradient of rank r's local features is W times the
        one-process gradient of those rows, and the MEAN over the ranks of any replicated
        parameter's gradient (encoder, heads, logit_scale) equals the one-process gradient.
    That mean is what DeepSpeed (and DDP) do to gradients over the data-parallel group (sum,
    then divide by its size), so the trainer gets exactly the union-batch gradient: back-
    propagate this loss as any other per-rank loss, and give the group that DeepSpeed averages
    over (ParallelState.data_group; under tensor parallelism, never the world).
    Every rank of the group must call this, and backward on its result, the same number of
    times (the gather's backward is a collective)."""
    if img.dim() != 2 or img.shape != txt.shape:
        raise ValueError(f"image features {tuple(img.shape)} and text features "
                         f"{tuple(txt.shape)} must both be [pairs, dim]")
    D = img.shape[1]
    n = img.shape[0]
    scale = logit_scale.float().reshape(()).exp().clamp(max=MAX_SCALE)
    # Both features in one collective (fp32: the features are small, the gradients exact).
    local = torch.cat([img, txt], dim=1).float()
    if group is None or dist.get_world_size(group) == 1:
        everything, offset, total, world = local, 0, n, 1
        if n == 0:
            raise ValueError("no pair in the batch: the contrastive loss is empty")
    else:
        everything, offset, sizes = gather_rows(local, group)
        total, world = sum(sizes), len(sizes)
    img_l, txt_l = local[:, :D], local[:, D:]
    img_all, txt_all = everything[:, :D], everything[:, D:]
    labels = torch.arange(offset, offset + n, device=img.device)
    logits_i2t = scale * img_l @ txt_all.t()
    logits_t2i = scale * txt_l @ img_all.t()
    per_pair = (F.cross_entropy(logits_i2t, labels, reduction="none")
                + F.cross_entropy(logits_t2i, labels, reduction="none")) / 2
    loss = per_pair.sum() * (world / total)
    with torch.no_grad():
        stats = torch.stack([per_pair.sum(), (logits_i2t.argmax(-1) == labels).sum().float(),
                             (logits_t2i.argmax(-1) == labels).sum().float(),
                             torch.tensor(float(n), device=img.device)]).float()
    return ContrastiveOutput(loss=loss, stats=stats, scale=scale.detach(), candidates=total,
                             gathered=everything.detach(), offset=offset)


class ContrastiveModel(nn.Module):
    """The dual encoder: a Multiway Transformer (`beit3`) and its contrastive heads (`itc`).
    The released retrieval / ITC-tuned files load into it (released_checkpoint.py) with
    nothing missing, and export from it in unilm BEiT3ForRetrieval's layout.

    `group`: the data-parallel group whose pairs are pooled as negatives (None: local only).
    forward(images, texts) takes the two views of dual_encoder_views."""

    def __init__(self, cfg: ModelConfig, tp: Optional[TPGroup] = None,
                 group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.cfg, self.tp, self.group = cfg, tp, group
        self.beit3 = MultiwayTransformer(cfg, tp)
        self.itc = ContrastiveHeads(cfg)

    def features(self, images: PackedBatch, texts: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """([n, D], [n, D]) unit vectors of the images of `images` and the texts of `texts`."""
        return dual_encoder_features(self, images, texts)

    def forward(self, images: PackedBatch, texts: PackedBatch) -> ContrastiveOutput:
        if images.num_samples != texts.num_samples:
            raise ValueError(f"{images.num_samples} images but {texts.num_samples} texts: the "
                             "views must hold one image and one text per pair")
        img, txt = self.features(images, texts)
        return contrastive_loss(img, txt, self.itc.logit_scale, self.group)
