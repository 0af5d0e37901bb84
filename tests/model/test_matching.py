"""Image-text matching: fusion batches built from the dual-encoder views (batch/fusion.py),
the hard-negative sampling, the ITM head and loss (model/matching.py), and, on 2 gloo ranks,
the views gathered over the group and negatives that refer to the other rank's pairs."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_style.batch import (KIND_PAIR, VISION, VL, Sample, dual_encoder_views,
                                  pack_samples, validate_packed)
from megatron_style.batch.fusion import fusion_pairs, gather_views
from megatron_style.batch.synthetic import random_sample
from megatron_style.config import model_config
from megatron_style.model import MultiwayTransformer
from megatron_style.model.matching import MatchingHead, hard_negatives, matching_loss, same_captions
from tests.model.batch_compare import assert_same_batch
from tests.parallel.tp_launch import run_workers

KINDS = ["pair", "image", "pair", "text", "pair", "pair", "image"]


def _cfg(**kw):
    # shared attention, one VL layer on top of 2
    return model_config("tiny", kernels="reference", **kw)


def _samples(cfg, kinds=KINDS, seed=0, start=0):
    g = torch.Generator().manual_seed(seed)
    return [random_sample(cfg, k, 3 + (5 * (i + start)) % 11, g) for i, k in enumerate(kinds)]


def _named(samples, prefix):
    for i, s in enumerate(samples):
        s.source = f"{prefix}/{i}"
    return samples


def _fusion_reference(pairs, image_index, text_index, cfg):
    """pack_samples of the unmasked (image, text) Samples: what fusion_pairs must equal."""
    P = cfg.num_patches
    return pack_samples([Sample(image=pairs[a].image, image_mask=torch.zeros(P, dtype=torch.bool),
                                text=pairs[b].text_targets,
                                source=f"{pairs[a].source}+{pairs[b].source}")
                         for a, b in zip(image_index.tolist(), text_index.tolist())], cfg)


def _randomized(module, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1),
            F.normalize(torch.randn(n, d, generator=g), dim=-1))


# ---- fusion batches -----------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_fusion_pairs_equal_packing_the_pair_samples(seed):
    cfg = _cfg()
    samples = _named(_samples(cfg, seed=seed), "shard")
    pairs = [s for s in samples if s.kind == KIND_PAIR]
    v = dual_encoder_views(pack_samples(samples, cfg), cfg)
    g = torch.Generator().manual_seed(seed)
    ii = torch.randint(0, len(pairs), (9,), generator=g)
    ti = torch.randint(0, len(pairs), (9,), generator=g)
    assert len(set(ii.tolist())) < 9 and len(set(ti.tolist())) < 9   # repeats are exercised
    got = fusion_pairs(v.images, v.texts, ii, ti, cfg)
    want = _fusion_reference(pairs, ii, ti, cfg)
    assert_same_batch(got, want)
    validate_packed(got, cfg)
    assert got.sources[0] == f"{pairs[int(ii[0])].source}+{pairs[int(ti[0])].source}"
    assert all(s.startswith("shard/") for s in got.sources[0].split("+"))
    # The fusion path uses the VL experts: every token goes to expert 2 in the VL layers.
    assert got.route_vl.counts == (0, 0, got.num_tokens) and VL == 2
    assert not got.image_mask.any() and got.text_targets.numel() == 0
    assert (got.sample_kind == KIND_PAIR).all()


def test_fusion_pairs_without_sources_and_input_errors():
    cfg = _cfg()
    v = dual_encoder_views(pack_samples(_samples(cfg), cfg), cfg)
    images = dataclasses.replace(v.images, sources=[])
    b = fusion_pairs(images, v.texts, torch.tensor([0, 1]), torch.tensor([1, 0]), cfg)
    assert b.sources == []
    with pytest.raises(ValueError, match="as many image indices"):
        fusion_pairs(v.images, v.texts, torch.tensor([0, 1]), torch.tensor([1]), cfg)
    with pytest.raises(ValueError, match="image-only"):
        fusion_pairs(v.texts, v.texts, torch.tensor([0]), torch.tensor([0]), cfg)
    with pytest.raises(ValueError, match="text-only"):
        fusion_pairs(v.images, v.images, torch.tensor([0]), torch.tensor([0]), cfg)


def test_gather_views_on_one_process_returns_the_inputs():
    cfg = _cfg()
    v = dual_encoder_views(pack_samples(_samples(cfg), cfg), cfg)
    gi, gt = gather_views(v.images, v.texts, None)
    assert gi is v.images and gt is v.texts


# ---- the head and the fusion path -----------------------------------------------------------
def test_head_layout_and_init():
    cfg = _cfg()
    head = MatchingHead(cfg)
    assert head.dense.weight.shape == (cfg.dim, cfg.dim) and head.head.weight.shape == (2, cfg.dim)
    for lin in (head.dense, head.head):
        lin = lin.requires_grad_(False)
        assert float(lin.weight.abs().max()) <= cfg.init_std * (1 + 1e-6)   # beit: cut at 1 std
        assert lin.bias.abs().max() == 0
    assert float(head.dense.weight.std()) == pytest.approx(cfg.init_std * 0.5396, rel=0.15)
    assert torch.equal(head.norm.weight.detach(), torch.ones(cfg.dim))
    out = head(torch.randn(5, cfg.dim))
    assert out.shape == (5, 2)


def _single_process_setup(cfg, seed=0):
    samples = _samples(cfg, seed=seed)
    v = dual_encoder_views(pack_samples(samples, cfg), cfg)
    n = v.images.num_samples
    img, txt = _features(n, cfg.dim, seed)
    torch.manual_seed(0)
    model = _randomized(MultiwayTransformer(cfg), seed=1).eval()
    head = _randomized(MatchingHead(cfg), seed=2)
    return model, head, v, img, txt


def _logits(model, head, v, img, txt, cfg):
    out = matching_loss(model, head, v.images, v.texts, img, txt, img, txt, 0, None, cfg,
                        generator=torch.Generator().manual_seed(5))
    return out.logits


def test_only_the_vl_experts_of_the_top_layer_see_the_pairs():
    cfg = _cfg()
    assert cfg.vl_layers >= 1 and cfg.attention == "shared"
    model, head, v, img, txt = _single_process_setup(cfg)
    with torch.no_grad():
        before = _logits(model, head, v, img, txt, cfg)
        top = model.layers[-1].ffn.experts
        assert len(top) == 3
        for e in (top[0], top[1]):          # the V and L experts of the top layer
            for p in e.parameters():
                p.add_(torch.randn_like(p))
        same = _logits(model, head, v, img, txt, cfg)
        for p in top[2].parameters():       # the VL expert
            p.add_(0.5 * torch.randn_like(p))
        changed = _logits(model, head, v, img, txt, cfg)
    assert torch.equal(same, before)
    assert (changed - before).abs().max() > 1e-3


def test_loss_and_stats_are_the_cross_entropy_of_the_3n_samples():
    cfg = _cfg()
    model, head, v, img, txt = _single_process_setup(cfg)
    n = v.images.num_samples
    out = matching_loss(model, head, v.images, v.texts, img, txt, img, txt, 0, None, cfg,
                        generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([1] * n + [0] * (2 * n))
    assert out.logits.shape == (3 * n, 2) and out.logits.dtype == torch.float32
    torch.testing.assert_close(out.loss.detach(), F.cross_entropy(out.logits, labels))
    assert float(out.stats[2]) == 3 * n
    assert float(out.stats[1]) == float((out.logits.argmax(-1) == labels).sum())
    m = out.metrics()
    assert m["loss/itm"] == pytest.approx(float(out.loss.detach()), rel=1e-5)
    assert m["acc/itm"] == pytest.approx(float(out.stats[1]) / (3 * n))
    # The samples are what the docstring says: recompute them through pack_samples.
    pairs = [s for s in _samples(cfg) if s.kind == KIND_PAIR]
    pos = torch.arange(n)
    ref = _fusion_reference(pairs, torch.cat([pos, pos, out.neg_image]),
                            torch.cat([pos, out.neg_text, pos]), cfg)
    with torch.no_grad():
        h = model.encode(ref, final_norm=False)
        cls = h.index_select(0, ref.cu_seqlens[:-1].long())
        want = head(model.norm_by_modality(cls, VISION))
    torch.testing.assert_close(out.logits, want)


def test_backward_reaches_the_head_and_the_vl_experts():
    cfg = _cfg()
    model, head, v, img, txt = _single_process_setup(cfg)
    model.train()
    img, txt = img.requires_grad_(), txt.requires_grad_()
    out = matching_loss(model, head, v.images, v.texts, img, txt, img, txt, 0, None, cfg)
    out.loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    vl = model.layers[-1].ffn.experts[2]
    for name, p in vl.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    # The V/L experts of the top layer take no pair token: tied in with a zero gradient.
    for e in model.layers[-1].ffn.experts[:2]:
        assert all(p.grad is None or p.grad.abs().max() == 0 for p in e.parameters())
    assert img.grad is None and txt.grad is None    # the sampling takes no gradient


def test_matching_loss_input_errors():
    cfg = _cfg()
    model, head, v, img, txt = _single_process_setup(cfg)
    with pytest.raises(ValueError, match="one of each per local pair"):
        matching_loss(model, head, v.images, v.texts, img[:-1], txt, img, txt, 0, None, cfg)
    with pytest.raises(ValueError, match="same group"):
        matching_loss(model, head, v.images, v.texts, img, txt, torch.cat([img, img]),
                      torch.cat([txt, txt]), 0, None, cfg)


# ---- hard negatives ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,N,offset", [(2, 2, 0), (1, 2, 1), (4, 7, 3), (6, 6, 0)])
def test_negatives_are_never_the_positive(seed, n, N, offset):
    g = torch.Generator().manual_seed(seed)
    # The positive strongly favoured: only its exclusion keeps it from being drawn.
    sims = [torch.randn(n, N, generator=g) * 3 for _ in range(2)]
    positives = torch.arange(offset, offset + n)
    for sim in sims:
        sim[torch.arange(n), positives] += 20
    draws = [hard_negatives(*sims, offset, g) for _ in range(50)]
    nt = torch.stack([d[0] for d in draws])
    ni = torch.stack([d[1] for d in draws])
    assert nt.dtype == torch.long and nt.shape == (50, n)
    assert (nt != positives).all() and (ni != positives).all()
    assert ((nt >= 0) & (nt < N)).all() and ((ni >= 0) & (ni < N)).all()
    if N == 2:   # the only choice is the other pair
        assert (nt == 1 - positives).all() and (ni == 1 - positives).all()


def test_negatives_are_deterministic_under_a_seeded_generator():
    g = torch.Generator().manual_seed(0)
    sim_i2t, sim_t2i = torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g)

    def draw(seed):
        return hard_negatives(sim_i2t, sim_t2i, 16, torch.Generator().manual_seed(seed))

    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    # without a generator: the default one, so a checkpointed RNG state replays the draws
    torch.manual_seed(3)
    d = hard_negatives(sim_i2t, sim_t2i, 16)
    torch.manual_seed(3)
    e = hard_negatives(sim_i2t, sim_t2i, 16)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


def test_negatives_follow_the_gathered_similarities():
    n, N, offset = 3, 8, 2
    sim_i2t = torch.zeros(n, N)
    sim_t2i = torch.zeros(n, N)
    # one non-positive column overwhelmingly likely per row (another rank's pair for some)
    want_t = torch.tensor([7, 0, 3])
    want_i = torch.tensor([5, 6, 1])
    sim_i2t[torch.arange(n), want_t] = 40.0
    sim_t2i[torch.arange(n), want_i] = 40.0
    # and the positive larger still: without its exclusion it would always win, and after
    # a softmax every other weight would underflow to 0
    sim_i2t[torch.arange(n), torch.arange(offset, offset + n)] = 1e4
    sim_t2i[torch.arange(n), torch.arange(offset, offset + n)] = 1e4
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        nt, ni = hard_negatives(sim_i2t, sim_t2i, offset, g)
        assert torch.equal(nt, want_t) and torch.equal(ni, want_i)
    # the two directions are drawn from their own matrices
    nt, ni = hard_negatives(sim_t2i, sim_i2t, offset, g)
    assert torch.equal(nt, want_i) and torch.equal(ni, want_t)


def test_non_finite_similarities_fall_back_to_the_other_pairs():
    sim = torch.full((2, 4), float("nan"))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        nt, ni = hard_negatives(sim, sim, 1, g)
        assert (nt != torch.tensor([1, 2])).all() and (ni != torch.tensor([1, 2])).all()


def test_negatives_need_two_pairs():
    with pytest.raises(ValueError, match="at least 2 pairs over the data-parallel group"):
        hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1), 0)
    with pytest.raises(ValueError, match="outside"):
        hard_negatives(torch.zeros(2, 3), torch.zeros(2, 3), 2)


# ---- two ranks -------------------------------------------------------------------------------
SPLIT = (3, 2)   # pairs per rank: unequal


def _rank_samples(cfg, rank):
    """Rank r's micro-batch: its pairs among image and text samples (masked, so unmasking is
    exercised), text lengths differing between ranks."""
    kinds = ["image", "pair", "text", "pair", "pair"] if rank == 0 else ["pair", "text", "pair"]
    return _samples(cfg, kinds, seed=10 + rank, start=rank)


def _union_pairs(cfg):
    return [s for r in range(len(SPLIT)) for s in _rank_samples(cfg, r) if s.kind == KIND_PAIR]


def _two_rank_worker(rank, world):
    import torch.distributed as dist
    cfg = _cfg()
    v = dual_encoder_views(pack_samples(_rank_samples(cfg, rank), cfg), cfg)
    assert v.images.num_samples == SPLIT[rank]
    gi, gt = gather_views(v.images, v.texts, dist.group.WORLD)
    N, offset = sum(SPLIT), sum(SPLIT[:rank])
    img_all, txt_all = _features(N, cfg.dim, seed=4)
    local = slice(offset, offset + SPLIT[rank])
    torch.manual_seed(0)
    model = _randomized(MultiwayTransformer(cfg), seed=1).eval()
    head = _randomized(MatchingHead(cfg), seed=2)
    runs = []
    with torch.no_grad():
        for seed in range(4):
            out = matching_loss(model, head, v.images, v.texts, img_all[local], txt_all[local],
                                img_all, txt_all, offset, dist.group.WORLD, cfg,
                                generator=torch.Generator().manual_seed(100 * rank + seed))
            runs.append({"loss": out.loss, "logits": out.logits, "stats": out.stats,
                         "neg_text": out.neg_text, "neg_image": out.neg_image})
    return {"images": gi, "texts": gt, "offset": offset, "runs": runs}


@pytest.fixture(scope="module")
def two_ranks():
    return run_workers(_two_rank_worker, 2)


@pytest.mark.multiproc
def test_gathered_views_equal_the_views_of_the_union(two_ranks):
    cfg = _cfg()
    pairs = _union_pairs(cfg)
    want = dual_encoder_views(pack_samples(pairs, cfg), cfg)
    for r in two_ranks:
        assert_same_batch(r["images"], want.images, skip=("sources",))
        assert_same_batch(r["texts"], want.texts, skip=("sources",))
        assert r["images"].sources == [] and r["texts"].sources == []
    lens = (want.texts.cu_seqlens[1:] - want.texts.cu_seqlens[:-1]).tolist()
    assert len(set(lens[:SPLIT[0]]) | set(lens[SPLIT[0]:])) > 1   # unequal text lengths


@pytest.mark.multiproc
def test_matching_on_two_ranks_draws_global_negatives(two_ranks):
    cfg = _cfg()
    pairs = _union_pairs(cfg)
    torch.manual_seed(0)
    model = _randomized(MultiwayTransformer(cfg), seed=1).eval()
    head = _randomized(MatchingHead(cfg), seed=2)
    crossed = 0
    for rank, r in enumerate(two_ranks):
        n, offset = SPLIT[rank], r["offset"]
        assert offset == sum(SPLIT[:rank])
        mine = set(range(offset, offset + n))
        pos = torch.arange(offset, offset + n)
        for run in r["runs"]:
            nt, ni = run["neg_text"], run["neg_image"]
            assert ((nt >= 0) & (nt < len(pairs))).all() and (nt != pos).all() and (ni != pos).all()
            crossed += sum(int(x) not in mine for x in torch.cat([nt, ni]))
            # The global indices name the right pairs: one process on the union, with the
            # same samples, computes the same logits.
            ref = _fusion_reference(pairs, torch.cat([pos, pos, ni]), torch.cat([pos, nt, pos]),
                                    cfg)
            with torch.no_grad():
                h = model.encode(ref, final_norm=False)
                cls = h.index_select(0, ref.cu_seqlens[:-1].long())
                want = head(model.norm_by_modality(cls, VISION))
            torch.testing.assert_close(run["logits"], want)
            assert torch.isfinite(run["loss"]) and float(run["stats"][2]) == 3 * n
    assert crossed > 0   # some negatives are the other rank's pairs


def test_a_pair_with_the_same_caption_is_never_drawn_as_a_negative():
    """Web data (and the demo's one-shape scenes) repeat captions: the pair whose text is
    the positive's own is no negative, however similar its features (here: the most)."""
    cfg = _cfg()
    g = torch.Generator().manual_seed(3)
    pairs = [random_sample(cfg, "pair", 6, g) for _ in range(4)]
    pairs[2].text, pairs[2].text_mask = pairs[0].text.clone(), None
    pairs[2].text_targets = None
    for s in pairs:
        s.text_mask, s.text_targets = None, None
    v = dual_encoder_views(pack_samples(pairs, cfg), cfg)
    same = same_captions(v.texts, 0, 4)
    assert same.tolist() == [[True, False, True, False], [False, True, False, False],
                             [True, False, True, False], [False, False, False, True]]
    sim = torch.zeros(4, 4)
    sim[0, 2] = sim[2, 0] = 30.0   # the duplicate would be the hardest by far
    for seed in range(20):
        nt, ni = hard_negatives(sim, sim, 0, torch.Generator().manual_seed(seed), exclude=same)
        assert int(nt[0]) != 2 and int(ni[0]) != 2 and int(nt[2]) != 0 and int(ni[2]) != 0
        assert (nt != torch.arange(4)).all() and (ni != torch.arange(4)).all()
