"""Image-text contrastive learning on one process: the dual-encoder views of a packed batch,
the CLS features, the symmetric loss (its clamp and accuracies), Recall@k, and the released
retrieval layout (unilm BEiT3ForRetrieval: beit3.* + vision_head, language_head, logit_scale).
The multi-rank invariants are tests/parallel/test_contrastive_ranks.py's."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_style.batch import (KIND_PAIR, Sample, dual_encoder_views,
                                  pack_samples, validate_packed)
from megatron_style.batch.synthetic import random_sample
from megatron_style.checkpoint.model_files import load_model_file
from megatron_style.config import model_config
from megatron_style.model import MaskedDataModel, MultiwayTransformer
from megatron_style.model.contrastive import (LOGIT_SCALE_INIT, MAX_SCALE, ContrastiveHeads,
                                              ContrastiveModel, contrastive_loss)
from megatron_style.model.released_checkpoint import (export_released_state_dict,
                                                      export_retrieval_state_dict,
                                                      fit_released_state_dict,
                                                      load_released_state_dict)
from megatron_style.model.retrieval import retrieval_recall
from tests.model.batch_compare import assert_same_batch

ITC_KEYS = ("vision_head.weight", "language_head.weight", "logit_scale")
KINDS = ["pair", "image", "text", "pair", "text", "pair", "image", "pair"]


def _cfg(**kw):
    # the released layout (decoupled attention, no VL expert) at tiny widths
    return model_config("tiny", attention="decoupled", vl_layers=0, kernels="reference", **kw)


def _samples(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [random_sample(cfg, k, 3 + (5 * i) % 11, g) for i, k in enumerate(KINDS)]


# ---- views ------------------------------------------------------------------------------
@pytest.mark.parametrize("visual_target", ["tokens", "pixels"])
def test_views_equal_packing_the_unmasked_pair_samples(visual_target):
    cfg = _cfg(visual_target=visual_target)
    samples = _samples(cfg)
    pairs = [s for s in samples if s.kind == KIND_PAIR]
    # The source is masked where it matters, so unmasking is tested, not assumed.
    assert all(s.image_mask.any() and s.text_mask.any() for s in pairs)
    b = pack_samples(samples, cfg)
    v = dual_encoder_views(b, cfg)
    want_img = pack_samples([Sample(image=s.image, source=s.source) for s in pairs], cfg)
    want_txt = pack_samples([Sample(text=s.text_targets, source=s.source) for s in pairs], cfg)
    assert_same_batch(v.images, want_img)
    assert_same_batch(v.texts, want_txt)
    assert v.pairs.tolist() == [i for i, k in enumerate(KINDS) if k == "pair"]
    assert not v.images.image_mask.any()
    validate_packed(v.images, cfg)
    validate_packed(v.texts, cfg)


def test_views_need_a_pair():
    cfg = _cfg()
    b = pack_samples([s for s in _samples(cfg) if s.kind != KIND_PAIR], cfg)
    with pytest.raises(ValueError, match="no image-text pair"):
        dual_encoder_views(b, cfg)


# ---- features ---------------------------------------------------------------------------
def test_features_are_the_cls_of_each_modality_alone(randomize):
    """Packed views == the reference layout, image alone and (padded) text alone: the CLS rows
    are picked right and normalised by their modality's final norm."""
    cfg = _cfg()
    model = randomize(ContrastiveModel(cfg), std=0.1).eval()
    pairs = [s for s in _samples(cfg) if s.kind == KIND_PAIR]
    v = dual_encoder_views(pack_samples(pairs, cfg), cfg)
    with torch.no_grad():
        img, txt = model.features(v.images, v.texts)
        images = torch.stack([s.image for s in pairs])
        L = max(len(s.text) for s in pairs)
        ids = torch.stack([F.pad(s.text_targets, (0, L - len(s.text))) for s in pairs])
        pad = torch.arange(L)[None] >= torch.tensor([len(s.text) for s in pairs])[:, None]
        want_img = model.itc.image_features(model.beit3.encode_padded(images=images)[:, 0])
        want_txt = model.itc.text_features(
            model.beit3.encode_padded(text_ids=ids, text_padding_mask=pad)[:, 0])
    torch.testing.assert_close(img, want_img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt, want_txt, rtol=1e-5, atol=1e-5)
    assert torch.allclose(img.norm(dim=-1), torch.ones(len(pairs)))


def test_every_parameter_gets_a_gradient():
    """ZeRO and DDP reduce every parameter each step: the unused ones (VL experts, the other
    modality's embeddings in each view) still join the graph with a zero gradient."""
    cfg = model_config("tiny", kernels="reference")   # shared attention, one VL layer
    model = ContrastiveModel(cfg)
    v = dual_encoder_views(pack_samples(_samples(cfg), cfg), cfg)
    model(v.images, v.texts).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert model.itc.logit_scale.grad.abs() > 0


def test_heads_init():
    cfg = _cfg()
    heads = ContrastiveHeads(cfg)
    assert heads.vision_head.bias is None and heads.language_head.bias is None
    assert heads.logit_scale.shape == (1,) and float(heads.logit_scale.detach()) == pytest.approx(2.65926, abs=1e-5)
    for w in (heads.vision_head.weight.detach(), heads.language_head.weight.detach()):
        assert w.shape == (cfg.dim, cfg.dim)
        assert float(w.abs().max()) <= cfg.init_std * (1 + 1e-6)          # beit: cut at 1 std
        assert float(w.std()) == pytest.approx(cfg.init_std * 0.5396, rel=0.1)
    assert not torch.equal(heads.vision_head.weight, heads.language_head.weight)


# ---- loss -------------------------------------------------------------------------------
def _features(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1),
            F.normalize(torch.randn(n, d, generator=g), dim=-1))


def _by_hand(img, txt, scale):
    s = scale * img @ txt.t()
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(s, labels) + F.cross_entropy(s.t(), labels)) / 2


def test_loss_is_the_symmetric_cross_entropy():
    img, txt = _features()
    ls = torch.tensor(LOGIT_SCALE_INIT)
    out = contrastive_loss(img, txt, ls)
    torch.testing.assert_close(out.loss, _by_hand(img, txt, 1 / 0.07))
    swapped = contrastive_loss(txt, img, ls)
    torch.testing.assert_close(swapped.loss, out.loss)
    assert (float(swapped.stats[1]), float(swapped.stats[2])) == (float(out.stats[2]), float(out.stats[1]))
    assert out.candidates == 6 and float(out.stats[3]) == 6
    torch.testing.assert_close(out.stats[0] / 6, out.loss)
    # one direction alone is not it
    s = img @ txt.t() / 0.07
    assert abs(float(out.loss - F.cross_entropy(s, torch.arange(6)))) > 1e-3


def test_temperature_is_clamped_at_100():
    img, txt = _features()
    big = torch.tensor(10.0, requires_grad=True)       # exp(10) = 22026
    out = contrastive_loss(img, txt, big)
    assert float(out.scale) == MAX_SCALE
    torch.testing.assert_close(out.loss, _by_hand(img, txt, 100.0))
    out.loss.backward()
    assert float(big.grad) == 0.0                       # clamped: no push further up
    below = torch.tensor(math.log(50.0), requires_grad=True)
    out = contrastive_loss(img, txt, below)
    torch.testing.assert_close(out.scale, torch.tensor(50.0))
    out.loss.backward()
    assert float(below.grad) != 0.0


def test_accuracies_count_top1_each_way():
    # img = identity, so the similarity matrix is txt^T: S[i, j] = score of image i, text j.
    S = torch.tensor([[0.9, 0.1, 0.0],
                      [0.8, 0.5, 0.0],      # image 1 prefers text 0: i2t wrong
                      [0.0, 0.0, 0.9]])     # every text's best image is its own: t2i right
    out = contrastive_loss(torch.eye(3), S.t().contiguous(), torch.tensor(0.0))
    assert (out.i2t_acc, out.t2i_acc) == (pytest.approx(2 / 3), 1.0)
    m = out.metrics()
    assert m["acc/itc_i2t"] == pytest.approx(2 / 3) and m["acc/itc_t2i"] == 1.0
    assert m["itc/candidates"] == 3 and m["itc/scale"] == 1.0


def test_loss_input_errors():
    img, txt = _features()
    with pytest.raises(ValueError, match="must both be"):
        contrastive_loss(img, txt[:5], torch.tensor(0.0))
    with pytest.raises(ValueError, match="no pair"):
        contrastive_loss(img[:0], txt[:0], torch.tensor(0.0))


# ---- recall -----------------------------------------------------------------------------
def _matrix_with_ranks(ranks, seed=0):
    """An N x N similarity matrix in which image i's own text is beaten by exactly ranks[i]
    other texts (distinct off-diagonal values; the diagonal placed between two of them)."""
    N = len(ranks)
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(N, N, generator=g, dtype=torch.float64)
    for i, r in enumerate(ranks):
        others = torch.cat([S[i, :i], S[i, i + 1:]]).sort(descending=True).values
        hi = others[r - 1] if r > 0 else others[0] + 1
        lo = others[r] if r < N - 1 else others[-1] - 1
        S[i, i] = (hi + lo) / 2
    return S


def _brute_ranks(S):
    """Independent of retrieval.py: for each column j, how many rows i != j score >= S[j, j]."""
    N = S.shape[0]
    return [sum(1 for i in range(N) if i != j and S[i, j] >= S[j, j]) for j in range(N)]


def test_recall_on_a_matrix_with_known_ranks():
    ranks = [0, 0, 0, 1, 2, 4, 4, 5, 9, 10, 15, 0, 3, 7, 0, 12]
    S = _matrix_with_ranks(ranks)
    N = len(ranks)
    # img = identity and txt = S^T give img @ txt^T = S; chunk=5 crosses block boundaries.
    got = retrieval_recall(torch.eye(N, dtype=torch.float64), S.t().contiguous(), chunk=5)
    t2i = _brute_ranks(S)
    for k in (1, 5, 10):
        assert got[f"i2t_r{k}"] == pytest.approx(100 * sum(r < k for r in ranks) / N)
        assert got[f"t2i_r{k}"] == pytest.approx(100 * sum(r < k for r in t2i) / N)
    assert got["i2t_r1"] == pytest.approx(100 * 5 / N) and got["i2t_r5"] == pytest.approx(100 * 10 / N)
    assert got["candidates"] == N
    six = [got[f"{w}_r{k}"] for w in ("i2t", "t2i") for k in (1, 5, 10)]
    assert got["mean_recall"] == pytest.approx(sum(six) / 6)


def test_recall_ties_count_against_the_match():
    same = torch.ones(5, 4)
    got = retrieval_recall(same, same, ks=(1, 5))
    assert got["i2t_r1"] == 0.0 and got["t2i_r1"] == 0.0
    assert got["i2t_r5"] == 100.0 and got["t2i_r5"] == 100.0
    perfect = retrieval_recall(torch.eye(5), torch.eye(5), ks=(1,))
    assert perfect["i2t_r1"] == 100.0 and perfect["t2i_r1"] == 100.0


# ---- released retrieval layout ----------------------------------------------------------
@pytest.fixture(scope="module")
def encoder_keys():
    with torch.device("meta"):
        return sorted(export_released_state_dict(MultiwayTransformer(_cfg())))


def _random_model(cfg, seed):
    model = ContrastiveModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_export_then_import_reproduces_every_tensor(tmp_path, encoder_keys):
    cfg = _cfg()
    sd = export_retrieval_state_dict(_random_model(cfg, 1))
    assert sorted(sd) == sorted(encoder_keys + list(ITC_KEYS))
    torch.save({"model": sd}, tmp_path / "retrieval.pth")
    fresh = ContrastiveModel(cfg)
    report = load_model_file(fresh, str(tmp_path / "retrieval.pth"))
    assert not any("ignored" in r or "created" in r for r in report), report
    back = export_retrieval_state_dict(fresh)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_a_file_in_unilm_retrieval_layout_loads_with_nothing_missing(tmp_path, encoder_keys):
    """What BEiT3ForRetrieval saves: {"model": beit3.* + the three head keys}."""
    D = _cfg().dim
    g = torch.Generator().manual_seed(3)
    with torch.device("meta"):
        shapes = export_released_state_dict(MultiwayTransformer(_cfg()))
    sd = {k: torch.randn(v.shape, generator=g) for k, v in shapes.items()}
    sd.update({"vision_head.weight": torch.randn(D, D, generator=g),
               "language_head.weight": torch.randn(D, D, generator=g),
               "logit_scale": torch.tensor(4.2)})
    torch.save({"model": sd}, tmp_path / "beit3_base_itc_patch16_224.pth")
    model = ContrastiveModel(_cfg())
    report = load_model_file(model, str(tmp_path / "beit3_base_itc_patch16_224.pth"))
    assert not any("ignored" in r or "created" in r for r in report), report
    assert float(model.itc.logit_scale.detach()) == pytest.approx(4.2)
    assert torch.equal(model.itc.vision_head.weight, sd["vision_head.weight"])
    assert torch.equal(model.itc.language_head.weight, sd["language_head.weight"])
    mine = export_retrieval_state_dict(model)
    assert all(torch.equal(mine[k], v) for k, v in sd.items())
    # all three are required when asked
    partial = {k: v for k, v in sd.items() if k != "logit_scale"}
    with pytest.raises(ValueError, match=r"missing \(1\): logit_scale"):
        load_released_state_dict(ContrastiveModel(_cfg()), partial, require_heads=True)


def test_pretrained_file_into_a_contrastive_model_creates_the_heads(encoder_keys):
    cfg = _cfg()
    sd = {k: v for k, v in export_retrieval_state_dict(_random_model(cfg, 4)).items()
          if k.startswith("beit3.")}
    model = ContrastiveModel(cfg)
    fitted, report = fit_released_state_dict(model, {"model": sd})
    text = "\n".join(report)
    assert "created vision_head.weight, language_head.weight, logit_scale" in text
    load_released_state_dict(model, fitted)
    assert float(model.itc.logit_scale.detach()) == pytest.approx(LOGIT_SCALE_INIT)


def test_masked_data_model_still_ignores_the_contrastive_heads():
    cfg = _cfg()
    sd = export_retrieval_state_dict(_random_model(cfg, 5))
    fitted, report = fit_released_state_dict(MaskedDataModel(cfg), sd)
    assert not set(ITC_KEYS) & set(fitted)
    assert any(r.startswith("ignored logit_scale") and "contrastive" in r for r in report)
    with pytest.raises(ValueError, match=r"unexpected \(3\): language_head.weight, logit_scale, "
                                         r"vision_head.weight"):
        load_released_state_dict(MaskedDataModel(cfg), sd)
    with pytest.raises(ValueError, match="contrastive heads"):
        export_retrieval_state_dict(MaskedDataModel(cfg))


def test_a_masked_data_model_with_itc_heads_round_trips():
    """An MDM + ITC model (VLMo-style: `itc` next to the prediction heads) exports both kinds
    of heads in the released names and reads them back."""
    cfg = _cfg()
    model = MaskedDataModel(cfg)
    model.itc = ContrastiveHeads(cfg)
    with torch.no_grad():
        model.itc.logit_scale.fill_(3.0)
    sd = export_released_state_dict(model)
    assert set(ITC_KEYS) <= set(sd) and any(k.startswith("mlm_head.") for k in sd)
    other = MaskedDataModel(cfg)
    other.itc = ContrastiveHeads(cfg)
    load_released_state_dict(other, sd, require_heads=True)
    assert all(torch.equal(export_released_state_dict(other)[k], v) for k, v in sd.items())


def test_unilm_retrieval_model_loads_our_export_and_computes_our_features(
        torchscale_beit3, randomize):
    """torchscale's BEiT3 with BEiT3ForRetrieval's heads: our export fills it with nothing
    missing or unexpected, and its dual-encoder features are ours."""
    BEiT3, EncoderConfig = torchscale_beit3
    cfg = _cfg()
    args = EncoderConfig(img_size=cfg.img_size, patch_size=cfg.patch_size,
                         vocab_size=cfg.text_vocab_size, multiway=True, layernorm_embedding=False,
                         normalize_output=True, no_output_layer=True, encoder_embed_dim=cfg.dim,
                         encoder_attention_heads=cfg.heads, encoder_ffn_embed_dim=cfg.ffn_dim,
                         encoder_layers=cfg.layers, max_source_positions=cfg.max_text_len + 2)

    class Retrieval(nn.Module):   # the parameters of unilm's BEiT3ForRetrieval
        def __init__(self):
            super().__init__()
            self.beit3 = BEiT3(args)
            self.language_head = nn.Linear(cfg.dim, cfg.dim, bias=False)
            self.vision_head = nn.Linear(cfg.dim, cfg.dim, bias=False)
            self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    ours = randomize(ContrastiveModel(cfg), std=0.1).eval()
    ref = Retrieval().eval()
    missing, unexpected = ref.load_state_dict(export_retrieval_state_dict(ours), strict=False)
    assert (missing, unexpected) == ([], [])
    g = torch.Generator().manual_seed(6)
    same_len = [random_sample(cfg, "pair", 9, g) for _ in range(3)]   # no padding needed
    v = dual_encoder_views(pack_samples(same_len, cfg), cfg)
    with torch.no_grad():
        img, txt = ours.features(v.images, v.texts)
        images = torch.stack([s.image for s in same_len])
        ids = torch.stack([s.text_targets for s in same_len])
        vis = ref.beit3(textual_tokens=None, visual_tokens=images)["encoder_out"][:, 0]
        lang = ref.beit3(textual_tokens=ids, visual_tokens=None,
                         text_padding_position=torch.zeros_like(ids, dtype=torch.bool))["encoder_out"][:, 0]
        want_img = F.normalize(ref.vision_head(vis), dim=-1)
        want_txt = F.normalize(ref.language_head(lang), dim=-1)
    torch.testing.assert_close(img, want_img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt, want_txt, rtol=1e-5, atol=1e-5)
    assert float(ref.logit_scale.detach()) == float(ours.itc.logit_scale.detach())
