"""ITC pooled over the step (objective.itc_batch: step; model/contrastive_step.py) equals one
contrastive batch of every pair of the step: 2 gloo ranks x 2 micro-batches each, unequal pair
counts, the real encoder with drop path on, fp32, with and without activation checkpointing.

The reference is one process: every (rank, micro-batch)'s features under the same seeds,
concatenated, through contrastive_loss with gradient. The pooled run does what the trainer
does: pass 1 without gradient, then per micro-batch forward(pool=...) and backward of
backward_loss / accumulation (DeepSpeed's division), gradients summed over the micro-batches
and averaged over the ranks (DeepSpeed's data-parallel mean). Loss, stats and every gradient
(encoder, heads, logit_scale) must agree to 1e-5."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_style.batch.pack import pack_samples
from megatron_style.batch.synthetic import random_sample
from megatron_style.batch.views import dual_encoder_views
from megatron_style.config import model_config
from megatron_style.model.contrastive import contrastive_loss
from megatron_style.model.contrastive_step import (StepPool, micro_seed, pair_features,
                                                   step_contrastive_loss, step_features)
from megatron_style.model.pretraining import MaskedDataModel
from tp_launch import run_workers

pytestmark = pytest.mark.multiproc

# pairs per (rank, micro-batch); every micro-batch also holds an image and a text sample
PAIRS = ((3, 2), (2, 4))
GAS = 2
ITC_ONLY = (0.0, 1.0, 0.0)


def _cfg():
    return model_config("tiny", kernels="reference", drop_path=0.3)


def _model(cfg, checkpointing=False):
    torch.manual_seed(0)
    m = MaskedDataModel(cfg, None, heads=("itc",))
    if checkpointing:  # as the trainer sets it: recomputed in backward, drop path replayed
        m.beit3.checkpoint_fn = lambda block, x, layout: torch.utils.checkpoint.checkpoint(
            block, x, layout, use_reentrant=False)
    with torch.no_grad():  # a logit scale whose gradient is not tiny
        m.itc.logit_scale.fill_(1.5)
    m.train()
    return m


def _batch(cfg, rank, micro):
    g = torch.Generator().manual_seed(100 * rank + micro)
    kinds = ["image", "text"] + ["pair"] * PAIRS[rank][micro]
    return pack_samples([random_sample(cfg, k, 4 + i % 5, g) for i, k in enumerate(kinds)], cfg)


def _seed(rank, micro):
    return micro_seed(7, step=3, micro=micro, dp_rank=rank)


def _grads(m):
    return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


def _reference():
    cfg = _cfg()
    m = _model(cfg)
    feats = [pair_features(m, dual_encoder_views(_batch(cfg, r, k), cfg), _seed(r, k))
             for r in range(2) for k in range(GAS)]
    f = torch.cat(feats)
    out = contrastive_loss(f[:, :cfg.dim], f[:, cfg.dim:], m.itc.logit_scale, None)
    out.loss.backward()
    return out.loss.detach(), out.stats, _grads(m), out.candidates


def _pooled_worker(rank, world, checkpointing):
    cfg = _cfg()
    m = _model(cfg, checkpointing)
    m.contrastive_group = dist.group.WORLD
    views = [dual_encoder_views(_batch(cfg, rank, k), cfg) for k in range(GAS)]
    seeds = tuple(_seed(rank, k) for k in range(GAS))
    rng_before = torch.get_rng_state()
    with torch.no_grad():
        step = step_features([pair_features(m, v, s) for v, s in zip(views, seeds)],
                             dist.group.WORLD, seeds)
    losses, stats = [], torch.zeros(4)
    for k in range(GAS):
        out = m(_batch(cfg, rank, k), weights=ITC_ONLY, views=views[k], pool=StepPool(step, k))
        (out.backward_loss / GAS).backward()
        losses.append(out.loss.detach())
        stats += out.objective_stats[:4]
    grads = _grads(m)
    for g in grads.values():
        dist.all_reduce(g)
        g /= world
    dist.all_reduce(stats)
    rng_untouched = torch.equal(rng_before, torch.get_rng_state())
    return {"losses": losses, "stats": stats, "grads": grads, "rng_untouched": rng_untouched,
            "candidates": step.gathered.shape[0]}


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "checkpointing"])
def pooled(request):
    return run_workers(_pooled_worker, 2, request.param)


def test_the_pooled_step_is_one_contrastive_batch(pooled):
    loss, stats, grads, candidates = _reference()
    assert candidates == sum(map(sum, PAIRS)) == pooled[0]["candidates"]
    for r in pooled:
        # every micro-batch reports the rank's step loss; their mean over ranks is the union's
        assert torch.allclose(r["losses"][0], r["losses"][1], atol=1e-6)
    mean_loss = sum(r["losses"][0] for r in pooled) / 2
    assert torch.allclose(mean_loss, loss, atol=1e-5), (mean_loss, loss)
    assert torch.allclose(pooled[0]["stats"], stats, atol=1e-4), (pooled[0]["stats"], stats)
    got = pooled[0]["grads"]
    # the MDM heads take no part (tied in with a zero so that every rank reduces them)
    assert set(got) - set(grads) == {"text_head.weight", "text_head.bias", "image_head.weight",
                                     "image_head.bias"}
    assert all(not got[k].any() for k in set(got) - set(grads))
    assert "itc.logit_scale" in got and float(grads["itc.logit_scale"].abs()) > 1e-3
    for k, g in grads.items():
        assert torch.allclose(got[k], g, atol=1e-5, rtol=1e-4), (k, (got[k] - g).abs().max())
    assert pooled[1]["grads"].keys() == got.keys()
    assert all(torch.equal(pooled[1]["grads"][k], got[k]) for k in got)


def test_the_passes_leave_the_run_random_stream_alone(pooled):
    assert all(r["rng_untouched"] for r in pooled)


def test_the_two_passes_must_see_the_same_micro_batches():
    cfg = _cfg()
    m = _model(cfg)
    views = [dual_encoder_views(_batch(cfg, 0, k), cfg) for k in range(GAS)]
    with torch.no_grad():
        step = step_features([pair_features(m, v, 1) for v in views], None, (1, 2))
    f = pair_features(m, views[1], 1)   # micro-batch 1's features passed as micro-batch 0's
    with pytest.raises(ValueError, match="micro-batch 0 has 2 pairs here but 3 in pass 1"):
        step_contrastive_loss(f[:, :cfg.dim], f[:, cfg.dim:], m.itc.logit_scale, None,
                              StepPool(step, 0))
    with pytest.raises(ValueError, match="2 micro-batches of features but 1 seeds"):
        step_features([torch.zeros(1, 4), torch.zeros(1, 4)], None, (1,))


# ---- ITM over the step ---------------------------------------------------------------------

def _pair_samples(cfg, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [random_sample(cfg, "pair", 3 + i % 4, g) for i in range(n)]


def test_the_step_views_are_the_views_of_all_its_pairs():
    from megatron_style.batch.fusion import concat_views
    from tests.model.batch_compare import assert_same_batch

    cfg = _cfg()
    parts = [_pair_samples(cfg, 3, 0), _pair_samples(cfg, 2, 1)]
    got = concat_views([tuple(dual_encoder_views(pack_samples(p, cfg), cfg)[:2]) for p in parts])
    want = dual_encoder_views(pack_samples(parts[0] + parts[1], cfg), cfg)
    assert_same_batch(got[0], want.images, skip=("sources",))
    assert_same_batch(got[1], want.texts, skip=("sources",))


def test_itm_negatives_come_from_the_whole_step():
    """Micro-batch 1's pairs see every pair of the step: with features that make pair 0 of
    micro-batch 0 the hardest candidate of both kinds, it is drawn, which a micro-batch-only
    pool (2 candidates) could not do."""
    from megatron_style.model.matching import MatchingHead, matching_loss

    cfg = _cfg()
    m = _model(cfg)
    head = MatchingHead(cfg)
    views = [dual_encoder_views(pack_samples(_pair_samples(cfg, n, s), cfg), cfg)
             for n, s in ((3, 0), (2, 1))]
    D = cfg.dim
    e = torch.eye(D)
    # micro-batch 1: images e0, texts e11, e12; micro-batch 0: pair 0 has the text e0 and an
    # image between e11 and e12 (the hardest negative both ways), the rest are orthogonal
    feats = [torch.cat([e[[5, 6, 7]], e[[8, 9, 10]]], 1), torch.cat([e[[0, 0]], e[[11, 12]]], 1)]
    feats[0][0] = torch.cat([(e[11] + e[12]) / 2 ** 0.5, e[0]])
    step = step_features(feats, None, (1, 2), views=[(v.images, v.texts) for v in views])
    assert step.views[0].num_samples == step.views[1].num_samples == 5
    g = step.gathered
    out = matching_loss(m.beit3, head, views[1].images, views[1].texts, feats[1][:, :D],
                        feats[1][:, D:], g[:, :D], g[:, D:], 3, None, cfg,
                        generator=torch.Generator().manual_seed(0), sim_scale=1e4,
                        candidates=step.views)
    assert out.neg_text.tolist() == [0, 0] and out.neg_image.tolist() == [0, 0]
    assert out.stats[2] == 6   # the pair and its two negatives, for both pairs
    with pytest.raises(ValueError, match="the candidate views hold 2 images and 2 texts but "
                                         "the gathered features 5 pairs"):
        matching_loss(m.beit3, head, views[1].images, views[1].texts, feats[1][:, :D],
                      feats[1][:, D:], g[:, :D], g[:, D:], 3, None, cfg)
