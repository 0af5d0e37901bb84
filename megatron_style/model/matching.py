"""Image-text matching (ITM): VLMo's second pair objective (arXiv 2111.02358, section 2.2),
ALBEF's ITM with hard negatives (arXiv 2107.07651, section 3.2).

A binary classifier on the fused pair: does this text describe this image?

    pair (image, text) -> fusion encoder -> first token -> Pooler -> Linear(D, 2)

For each of a rank's n pairs, three samples: the pair itself (label 1), its image with a
negative text (0), a negative image with its text (0); the loss is the cross-entropy over the 3n.

Hard negatives. Random negatives are too easy: almost any caption is plainly wrong for a random
image, and the classifier learns nothing about fine-grained alignment. As ALBEF and VLMo do,
each negative is drawn from the ITC similarities (softmax over the candidates, the positive
excluded), so the texts the dual encoder already confuses with the right one are the likeliest
negatives, while the sampling (rather than an arg-max) keeps some variety and does not always
pick a noisy web pair's near-duplicate.

The fusion path. The samples are pair samples of a packed batch (batch/fusion.py): attention
runs over the image and text tokens together, and in the top `vl_layers` layers every token
goes to the vision-language (VL) expert (pack.py's route_vl). This is what trains the VL
experts, which the dual encoder of ITC never uses: in VLMo the bottom layers are the V/L
experts and the top ones fuse, and ITM (with MLM on pairs) is what shapes the fusion layers.

Gathering over the data-parallel group. Negatives come from every rank's pairs (as ITC's
candidates do), so each rank gathers the micro-batch's pair images and texts of every
data-parallel rank (batch.fusion.gather_views; no gradient, they are inputs). The cost, per
micro-batch, is one all_gather of N images ([N, C, H, W]: ~600 KB per 224px fp32 image, so
~600 MB for N = 1024 pairs) and of the text ids, plus the memory to hold them; only the 2n
chosen negatives are then encoded, so the compute is that of 3n pair samples. It is accepted
because VLMo does exactly this, and negatives from the whole batch are harder: the hardest
confusions of a 1024-pair union are much closer than those of a 32-pair rank.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron_style.batch import VISION, PackedBatch
from megatron_style.batch.fusion import fusion_pairs, gather_views
from megatron_style.config import ModelConfig
from megatron_style.model.init import init_rule
from megatron_style.model.transformer import MultiwayTransformer
from megatron_style.parallel.layers import init_trunc_normal_


class MatchingHead(nn.Module):
    """BEiT-3's Pooler (unilm beit3 modeling_utils.Pooler: LayerNorm, Linear(D, D), tanh on
    the first token's state) then the binary classifier Linear(D, 2). Matrices drawn with the
    model's init rule (model/init.py), as ContrastiveHeads; biases zero. Plain replicated
    modules: the head is small next to one layer, and its input (the encoder's output) is
    replicated within a tensor-parallel group already."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, rule = cfg.dim, init_rule(cfg)
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.dense = nn.Linear(D, D)
        self.head = nn.Linear(D, 2)
        with torch.no_grad():
            for lin in (self.dense, self.head):
                init_trunc_normal_(lin.weight, rule.std, rule.cut)
                lin.bias.zero_()

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        """[S, 2] logits (index 1 = match) from [S, D] first-token states."""
        return self.head(torch.tanh(self.dense(self.norm(cls))))


@torch.no_grad()
def hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, offset: int,
                   generator: Optional[torch.Generator] = None,
                   exclude: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(neg_text [n], neg_image [n]): global indices of one negative text per local image and
    one negative image per local text. `sim_i2t[i]` scores local image i (global pair
    offset + i) against the N texts of the group, `sim_t2i[i]` local text i against the N
    images; each negative is drawn from the softmax of its row with the positive (column
    offset + i) given probability exactly 0.

    Drawn with torch.multinomial from `generator`, or from the device's default generator when
    None (the trainer checkpoints that one, so a resumed run draws the same negatives). In
    fp32. The positive is masked before the softmax (not zeroed after it, as ALBEF's
    fill_diagonal_ does), so a row whose positive dominates cannot underflow to all zeros; a
    row that is not finite anyway (NaN or inf similarities) falls back to uniform over the
    other candidates rather than failing inside multinomial.

    `exclude` [n, N] bool: candidates that are no negatives of local pair i either (pairs with
    the same caption: same_captions), given probability 0 too; a row left without any
    candidate draws uniformly from the other pairs."""
    if sim_i2t.dim() != 2 or sim_i2t.shape != sim_t2i.shape:
        raise ValueError(f"similarities {tuple(sim_i2t.shape)} and {tuple(sim_t2i.shape)} must "
                         "both be [local pairs, pairs of the group]")
    n, N = sim_i2t.shape
    if N < 2:
        raise ValueError(f"ITM needs at least 2 pairs over the data-parallel group (got {N}): a "
                         "hard negative is another pair's image or text. Give each micro-batch "
                         "more pairs (or pool them over more data-parallel ranks)")
    if offset < 0 or offset + n > N:
        raise ValueError(f"local pairs {offset}..{offset + n - 1} are outside the {N} pairs of "
                         "the group")
    dev = sim_i2t.device
    positive = torch.zeros(n, N, dtype=torch.bool, device=dev)
    positive[torch.arange(n, device=dev), torch.arange(offset, offset + n, device=dev)] = True
    fallback = (~positive).float()
    banned = positive if exclude is None else positive | exclude.to(dev)

    def draw(sim: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(sim.float().masked_fill(banned, float("-inf")), dim=1)
        ok = torch.isfinite(w).all(1, keepdim=True) & (w.sum(1, keepdim=True) > 0)
        w = torch.where(ok, w, fallback)
        return torch.multinomial(w, 1, generator=generator).squeeze(1)

    return draw(sim_i2t), draw(sim_t2i)


class MatchingOutput(NamedTuple):
    # NamedTuple for the same reason as MDMOutput (ZeRO-3 sees inside it).
    loss: torch.Tensor        # scalar: the mean cross-entropy over this rank's 3n samples
    # [3] detached, additive over ranks: (sum of the CE over this rank's ITM samples,
    # correctly classified samples, ITM samples)
    stats: torch.Tensor
    neg_text: torch.Tensor    # [n] global indices of the negative texts drawn (detached)
    neg_image: torch.Tensor   # [n] global indices of the negative images drawn (detached)
    # [3n, 2] detached fp32 logits, samples in the order positives, negative texts, negative
    # images (row i, n + i, 2n + i: local pair i)
    logits: torch.Tensor

    def metrics(self, stats: Optional[torch.Tensor] = None) -> dict[str, float]:
        """Loss and accuracy of the local ITM samples, or of all ranks' when given `stats`
        summed over the data-parallel group (all_reduce SUM of `self.stats`)."""
        s = (self.stats if stats is None else stats).double().cpu()
        n = float(s[2])
        if n <= 0:
            return {}
        return {"loss/itm": float(s[0]) / n, "acc/itm": float(s[1]) / n}


def same_captions(texts: PackedBatch, offset: int, n: int) -> torch.Tensor:
    """[n, N] bool: whether pair j of the text-only batch `texts` (N pairs, gathered) has
    exactly the ids of the caption of pair offset + i. Such a pair is no negative of pair i:
    its text matches pair i's image as well as pair i's own text does (web data repeats
    captions; the demo's one-shape scenes do often), and trained as "no match" it teaches the
    head to contradict itself."""
    cu = texts.cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    N, L = lens.numel(), int(lens.max())
    padded = texts.text_ids.new_full((N, L), -1)
    row = torch.arange(N, device=lens.device).repeat_interleave(lens)
    col = torch.arange(texts.text_ids.numel(), device=lens.device) - cu[:-1].repeat_interleave(lens)
    padded[row, col] = texts.text_ids
    mine = padded[offset:offset + n]
    return (mine.unsqueeze(1) == padded.unsqueeze(0)).all(-1)


def matching_loss(beit3: MultiwayTransformer, head: MatchingHead, images: PackedBatch,
                  texts: PackedBatch, img_local: torch.Tensor, txt_local: torch.Tensor,
                  img_all: torch.Tensor, txt_all: torch.Tensor, offset: int,
                  group: Optional[dist.ProcessGroup], cfg: ModelConfig,
                  generator: Optional[torch.Generator] = None,
                  sim_scale: Union[float, torch.Tensor] = 1.0,
                  candidates: Optional[tuple[PackedBatch, PackedBatch]] = None) -> MatchingOutput:
    """ITM with hard negatives over the pairs of every rank of `group` (see the module
    docstring).

    `images`, `texts`: this rank's dual-encoder views (n pairs, batch.dual_encoder_views).
    `img_local`, `txt_local` [n, D] and `img_all`, `txt_all` [N, D]: the L2-normalised ITC
    features of the local pairs and of the union over `group` (rank order, this rank's rows
    from `offset`), as contrastive_loss gathers them; detached here (sampling takes no
    gradient). Negatives are drawn from sim_scale * cosine (hard_negatives); the default 1 is
    the plain cosine, nearly uniform over candidates (weights within e^2 of each other), while
    VLMo and ALBEF sample from the ITC logits: pass ContrastiveOutput.scale for that.

    The 3n samples ((image offset+i, text offset+i) label 1; (image offset+i, text
    neg_text[i]) and (image neg_image[i], text offset+i) label 0) go through the encoder as
    one fusion batch; each sample's first token (the image CLS), after the final vision norm,
    feeds `head`; fp32 cross-entropy, mean over the 3n samples.

    The loss is this rank's mean. DeepSpeed averages the ranks' gradients, which equals the
    gradient of the mean over all ranks' ITM samples when every rank holds the same number of
    pairs (otherwise a rank's samples weigh 1 / (W * 3 n_rank) each). Every rank of `group`
    must call this the same number of times (gather_views is collective).

    `candidates`: the (image view, text view) of every pair that `img_all` / `txt_all` hold,
    in their order, when the caller has them already: ITM over a whole step
    (model/contrastive_step.py) passes the step's views of every rank, gathered once per step,
    with the step's features and this micro-batch's `offset` in them. Then nothing is
    gathered here."""
    n = images.num_samples
    if texts.num_samples != n or img_local.shape[0] != n or txt_local.shape[0] != n:
        raise ValueError(f"{images.num_samples} images, {texts.num_samples} texts, "
                         f"{img_local.shape[0]} and {txt_local.shape[0]} local features: ITM "
                         "needs one of each per local pair")
    if img_all.shape != txt_all.shape or img_all.shape[1:] != img_local.shape[1:]:
        raise ValueError(f"gathered features {tuple(img_all.shape)} and {tuple(txt_all.shape)} "
                         f"do not match the local ones {tuple(img_local.shape)}")
    if n == 0:
        raise ValueError("this rank holds no pair: there is nothing to match")
    N = img_all.shape[0]
    all_images, all_texts = (gather_views(images, texts, group) if candidates is None
                             else candidates)
    if all_images.num_samples != N or all_texts.num_samples != N:
        raise ValueError(f"the candidate views hold {all_images.num_samples} images and "
                         f"{all_texts.num_samples} texts but the gathered features {N} pairs: "
                         "give both the same group (or the same step)")
    with torch.no_grad():
        sim_i2t = sim_scale * (img_local.detach().float() @ txt_all.detach().float().t())
        sim_t2i = sim_scale * (txt_local.detach().float() @ img_all.detach().float().t())
        neg_text, neg_image = hard_negatives(sim_i2t, sim_t2i, offset, generator,
                                             exclude=same_captions(all_texts, offset, n))
    dev = images.images.device
    pos = torch.arange(offset, offset + n, device=dev)
    neg_text, neg_image = neg_text.to(dev), neg_image.to(dev)
    batch = fusion_pairs(all_images, all_texts, torch.cat([pos, pos, neg_image]),
                         torch.cat([pos, neg_text, pos]), cfg)
    labels = torch.cat([torch.ones(n, dtype=torch.long, device=dev),
                        torch.zeros(2 * n, dtype=torch.long, device=dev)])
    h = beit3.encode(batch, final_norm=False)
    # The CLS state after the final vision norm (a pair's first token is its image's CLS):
    # what unilm's poolers read (`encoder_out`), so a head trained here sees what they see.
    cls = beit3.norm_by_modality(h.index_select(0, batch.cu_seqlens[:-1].long()), VISION)
    logits = head(cls).float()
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    loss = per_sample.mean()
    with torch.no_grad():
        stats = torch.stack([per_sample.sum(), (logits.argmax(-1) == labels).sum().float(),
                             torch.tensor(float(3 * n), device=dev)]).float()
    return MatchingOutput(loss=loss, stats=stats, neg_text=neg_text, neg_image=neg_image,
                          logits=logits.detach())
