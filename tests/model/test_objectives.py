"""The pretraining model's objectives on one process: forward(batch, weights=(mdm, itc, itm))
is exactly the weighted sum of the objectives computed on their own, an objective with weight 0
is not computed but its parameters still join the graph (zero gradient), and weights that need
heads the model lacks are refused."""
from __future__ import annotations

import pytest
import torch

from megatron_style.batch import LANGUAGE, VISION, dual_encoder_views
from megatron_style.batch.synthetic import random_batch
from megatron_style.config import model_config
from megatron_style.model import MaskedDataModel
from megatron_style.model.contrastive import cls_states, contrastive_loss


def _cfg(**kw):
    return model_config("tiny", kernels="reference", **kw)


def _model(cfg, heads=("itc",), seed=0):
    torch.manual_seed(seed)
    return MaskedDataModel(cfg, heads=heads)


def test_mdm_only_model_is_unchanged_by_the_objective_path():
    cfg = _cfg()
    b = random_batch(cfg, 3, 3, 3, seed=1)
    m = _model(cfg, heads=())
    out = m(b)
    assert out.objective_stats is None
    assert torch.equal(out.loss, m._mdm(b).loss)


def test_mdm_plus_itc_is_the_weighted_sum_of_the_two_losses():
    cfg = _cfg()
    b = random_batch(cfg, 2, 2, 5, seed=2)
    m = _model(cfg)
    out = m(b, weights=(1.0, 0.5, 0.0))
    views = dual_encoder_views(b, cfg)
    img = m.itc.image_features(cls_states(m.beit3, views.images, VISION))
    txt = m.itc.text_features(cls_states(m.beit3, views.texts, LANGUAGE))
    itc = contrastive_loss(img, txt, m.itc.logit_scale)
    want = m._mdm(b).loss + 0.5 * itc.loss
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-6)
    assert torch.equal(out.objective_stats[:4], itc.stats)
    assert float(out.objective_stats[3]) == 5  # the batch's pairs
    # the views may be built by the caller (the trainer does, on the CPU)
    again = m(b, weights=(1.0, 0.5, 0.0), views=views)
    torch.testing.assert_close(again.loss, out.loss, rtol=0, atol=0)


def test_itc_alone_leaves_the_mdm_heads_with_zero_gradient():
    cfg = _cfg()
    b = random_batch(cfg, 2, 2, 4, seed=3)
    m = _model(cfg)
    out = m(b, weights=(0.0, 1.0, 0.0))
    assert float(out.stats.abs().sum()) == 0  # no masked-modeling statistics
    out.loss.backward()
    for p in [*m.text_head.parameters(), *m.image_head.parameters()]:
        assert p.grad is not None and float(p.grad.abs().sum()) == 0
    assert float(m.itc.vision_head.weight.grad.abs().sum()) > 0
    assert float(m.itc.logit_scale.grad.abs()) > 0


def test_mdm_alone_with_itc_heads_gives_them_zero_gradient():
    cfg = _cfg()
    b = random_batch(cfg, 2, 2, 2, seed=4)
    m = _model(cfg)
    out = m(b, weights=(1.0, 0.0, 0.0))
    out.loss.backward()
    assert float(out.objective_stats.abs().sum()) == 0
    for p in m.itc.parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) == 0


def test_weights_that_need_missing_heads_are_refused():
    cfg = _cfg()
    m = _model(cfg, heads=())
    with pytest.raises(ValueError, match="model_heads"):
        m(random_batch(cfg, 1, 1, 2, seed=5), weights=(1.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="unknown heads"):
        MaskedDataModel(cfg, heads=("itx",))


def test_init_from_our_layout_across_the_optional_heads(tmp_path):
    """An MDM-only export starts an ITC run (heads created, reported); an ITC export starts an
    MDM-only run (heads ignored, reported); every shared tensor is the file's."""
    from megatron_style.checkpoint.model_files import load_model_file
    cfg = _cfg()
    plain, with_itc = _model(cfg, heads=(), seed=1), _model(cfg, heads=("itc", "itm"), seed=2)
    torch.save({"model": plain.state_dict()}, tmp_path / "mdm.pt")
    torch.save({"model": with_itc.state_dict()}, tmp_path / "itc.pt")
    target = _model(cfg, heads=("itc", "itm"), seed=3)
    heads_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith(("itc.", "itm."))}
    report = load_model_file(target, str(tmp_path / "mdm.pt"))
    assert any(r.startswith("init_from: created itc.language_head.weight") for r in report)
    for k, v in target.state_dict().items():
        assert torch.equal(v, heads_before[k] if k in heads_before else plain.state_dict()[k]), k
    back = _model(cfg, heads=(), seed=4)
    report = load_model_file(back, str(tmp_path / "itc.pt"))
    assert any(r.startswith("init_from: ignored itc.") for r in report)
    assert all(torch.equal(v, with_itc.state_dict()[k]) for k, v in back.state_dict().items())
    torch.save({"model": {**plain.state_dict(), "beit3.extra": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unexpected"):
        load_model_file(_model(cfg, heads=()), str(tmp_path / "bad.pt"))
