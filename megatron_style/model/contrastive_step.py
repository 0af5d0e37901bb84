"""ITC over the whole step (objective.itc_batch: step): every micro-batch of the step on every
data-parallel rank are each other's negatives, whatever the gradient accumulation.

A contrastive loss does not split over micro-batches: each pair's loss depends on every
other pair's features. So the step runs in two passes (gradient caching; open_clip's
accum_freq does the same):

  1. `pair_features` of every micro-batch without gradient, gathered over the group once
     (`step_features`): the step's features, [N, 2D] in rank order, then micro-batch order.
  2. For micro-batch k, its features again, with gradient; `step_contrastive_loss` puts every
     rank's block k (gathered with gradient) into the cached step features and computes this
     rank's loss over ALL its pairs of the step against all N. Only block k is live, so
     backward gives exactly d(step loss)/d(block k) * d(block k)/d(weights); summed over k,
     the gradient of the step loss, which is one contrastive batch of N pairs.

The two passes must compute the same features: each micro-batch's ITC forwards run under a
seed of their own (`pair_features(seed=...)`: drop path draws the same numbers in both),
without touching the run's random stream. logit_scale enters every micro-batch's loss
directly, so only micro-batch 0 passes it a gradient (otherwise it would get gas times its
gradient). The loss value is the step's in every micro-batch; a caller that averages the
micro-batches' gradients (DeepSpeed divides by the accumulation) multiplies ITC's gradient by
the accumulation to get the sum (MaskedDataModel.forward returns `backward_loss` for that).
Stats count the rows of micro-batch k only, so they add up over the step as usual.

ITM over the step: each micro-batch's pairs draw their hard negatives from the ITC
similarities against every pair of the step (VLMo draws from its whole batch), so pass 1 also
gathers the step's views of every rank, once (StepFeatures.views); each micro-batch then runs
its own fusion batch (its pairs and their negatives) as without the pool.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_style.model.contrastive import (MAX_SCALE, ContrastiveOutput,
                                              dual_encoder_features, gather_rows)


class StepFeatures(NamedTuple):
    """Pass 1's result: the step's ITC features of every rank of the group."""

    gathered: torch.Tensor              # [N, 2D] fp32, detached: image then text features
    sizes: tuple[tuple[int, ...], ...]  # sizes[r][k]: pairs of rank r in micro-batch k
    rank: int                           # this rank's place in the group
    seeds: tuple[int, ...]              # each micro-batch's seed for its ITC forwards
    # (image view, text view) of the N pairs in `gathered`'s order, for ITM over the step;
    # None when ITM does not run (they are the step's images of every rank)
    views: Optional[tuple] = None

    @property
    def micro_batches(self) -> int:
        return len(self.seeds)


class StepPool(NamedTuple):
    """What MaskedDataModel.forward needs to compute micro-batch `micro`'s share."""

    step: StepFeatures
    micro: int


def pair_features(model, views, seed: Optional[int] = None) -> torch.Tensor:
    """[n, 2D]: the L2-normalised image features then text features of the views' pairs
    (`model` holds `beit3` and `itc`). With `seed`, computed under that seed on a forked
    random stream, so that the two passes draw the same drop-path numbers and the run's own
    stream is left as it was."""
    def run() -> torch.Tensor:
        return torch.cat(dual_encoder_features(model, views.images, views.texts), dim=1)

    if seed is None:
        return run()
    dev = views.images.images.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        return run()


def micro_seed(seed: int, step: int, micro: int, dp_rank: int) -> int:
    """The seed of micro-batch `micro`'s ITC forwards at `step` on a data-parallel rank: the
    same on every tensor rank of it (their drop path must agree), different across steps,
    micro-batches and data-parallel ranks."""
    return ((((seed * 1_000_003) + step) * 4099 + micro) * 65_537 + dp_rank) % (2 ** 62)


def step_features(features: list[torch.Tensor], group: Optional[dist.ProcessGroup],
                  seeds: tuple[int, ...], views: Optional[list] = None) -> StepFeatures:
    """Collective over `group` (None: this process alone). `features[k]`: pass 1's
    pair_features of micro-batch k, [n_k, 2D] (n_k may be 0 on some ranks and micro-batches).
    `views[k]`: micro-batch k's (image view, text view), given when ITM runs: the step's views
    of every rank are gathered once, for ITM to draw its negatives from the whole step."""
    if len(features) != len(seeds) or (views is not None and len(views) != len(seeds)):
        raise ValueError(f"{len(features)} micro-batches of features"
                         + (f", {len(views)} of views" if views is not None else "")
                         + f" but {len(seeds)} seeds")
    local = torch.cat(features).detach().float()
    counts = torch.tensor([f.shape[0] for f in features], dtype=torch.long, device=local.device)
    if group is None or dist.get_world_size(group) == 1:
        sizes, rank, gathered = (tuple(int(c) for c in counts),), 0, local
    else:
        parts = [torch.empty_like(counts) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, counts, group=group)
        sizes = tuple(tuple(int(c) for c in p) for p in parts)
        with torch.no_grad():
            gathered, _, _ = gather_rows(local, group, sizes=[sum(p) for p in sizes])
        rank = dist.get_rank(group)
    if sum(map(sum, sizes)) == 0:
        raise ValueError("no rank holds a pair in any micro-batch of the step: the "
                         "contrastive loss is empty")
    step_views = None
    if views is not None:
        from megatron_style.batch.fusion import concat_views, gather_views
        step_views = gather_views(*concat_views(views), group)
    return StepFeatures(gathered, sizes, rank, tuple(seeds), step_views)


def step_contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                          group: Optional[dist.ProcessGroup], pool: StepPool) -> ContrastiveOutput:
    """Collective. Micro-batch `pool.micro`'s share of the step's ITC (module docstring).
    `img`, `txt`: its live [n, D] features (pair_features under its seed, split). The loss is
    this rank's step loss, W / N * sum over its step pairs of (CE_i2t + CE_t2i) / 2, as
    contrastive_loss on the whole step would return; `gathered` holds the step's features
    (all N pairs, micro-batch k's as computed now) and `offset` where micro-batch k's rows of
    this rank start in it: what ITM over the step draws its negatives from."""
    step, k = pool.step, pool.micro
    sizes, r = step.sizes, step.rank
    n, D = img.shape[0], img.shape[1]
    if n != sizes[r][k]:
        raise ValueError(f"micro-batch {k} has {n} pairs here but {sizes[r][k]} in pass 1: "
                         "the two passes must see the same micro-batches")
    W, N = len(sizes), sum(map(sum, sizes))
    local = torch.cat([img, txt], dim=1).float()
    # every rank's count of micro-batch k is known from pass 1: no count collective here
    live = (gather_rows(local, group, sizes=[s[k] for s in sizes])[0]
            if W > 1 and sum(s[k] for s in sizes) else local)
    rank_start = [sum(map(sum, sizes[:q])) for q in range(W)]
    idx = torch.cat([torch.arange(rank_start[q] + sum(sizes[q][:k]),
                                  rank_start[q] + sum(sizes[q][:k + 1])) for q in range(W)])
    everything = step.gathered.index_copy(0, idx.to(local.device), live)
    o, m = rank_start[r], sum(sizes[r])
    mine = everything[o:o + m]
    scale = logit_scale.float().reshape(()).exp().clamp(max=MAX_SCALE)
    if k > 0:  # logit_scale is in every micro-batch's loss: its gradient comes once
        scale = scale.detach()
    labels = torch.arange(o, o + m, device=local.device)
    logits_i2t = scale * mine[:, :D] @ everything[:, D:].t()
    logits_t2i = scale * mine[:, D:] @ everything[:, :D].t()
    per_pair = (F.cross_entropy(logits_i2t, labels, reduction="none")
                + F.cross_entropy(logits_t2i, labels, reduction="none")) / 2
    loss = per_pair.sum() * (W / N)
    b0 = sum(sizes[r][:k])
    with torch.no_grad():
        rows = slice(b0, b0 + n)
        lab = labels[rows]
        stats = torch.stack([per_pair[rows].sum(),
                             (logits_i2t[rows].argmax(-1) == lab).sum().float(),
                             (logits_t2i[rows].argmax(-1) == lab).sum().float(),
                             torch.tensor(float(n), device=local.device)]).float()
    return ContrastiveOutput(loss=loss, stats=stats, scale=scale.detach(), candidates=N,
                             gathered=everything.detach(), offset=o + b0)
