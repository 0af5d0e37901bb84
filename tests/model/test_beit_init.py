"""model.init=beit is the paper's initialisation (BEiT-3 section 2.3 and its footnote): every
weight trunc-normal with std 0.02 cut at +-1 std (values in [-0.02, 0.02]), then layer l's
attention out_proj and the fc2 of every expert divided by sqrt(2 l). Measured on built 12-layer
models of both attention layouts, at TP=1 and TP=2, and built on the meta device."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_style.checkpoint.tp_split import merge_tp
from megatron_style.config import model_config
from megatron_style.model import MaskedDataModel
from megatron_style.model.init import truncated_std_factor
from megatron_style.parallel.mappings import TPGroup

STD = 0.02
T1 = truncated_std_factor(1.0)  # 0.5396: std of N(0, 1) cut at +-1
LAYOUTS = {"shared": dict(attention="shared", vl_layers=3),
           "decoupled": dict(attention="decoupled", vl_layers=0)}


def _cfg(layout, **kw):
    # 12 layers as BEiT-3 base; width 128 keeps the sampling error of each std near 0.5 %.
    return model_config("tiny", layers=12, dim=128, ffn_dim=256, heads=4, **LAYOUTS[layout], **kw)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def built(request):
    torch.manual_seed(0)
    cfg = _cfg(request.param)
    return cfg, MaskedDataModel(cfg)


def _rel_sampling_error(n: int) -> float:
    # std of a sample std, relative: sqrt((kurtosis - 1) / (4 n)); the cut normal's kurtosis < 3
    return math.sqrt(2 / (4 * n))


def test_truncation_factor():
    assert truncated_std_factor(1.0) == pytest.approx(0.53956, abs=1e-5)
    assert truncated_std_factor(2.0) == pytest.approx(0.87963, abs=1e-5)
    x = torch.nn.init.trunc_normal_(torch.empty(200_000), std=1.0, a=-1.0, b=1.0)
    assert x.std().item() == pytest.approx(T1, rel=0.01)


def test_output_matrices_are_divided_by_sqrt_2l(built):
    cfg, model = built
    rows = []
    for i, layer in enumerate(model.beit3.layers):
        l = i + 1
        want = STD * T1 / math.sqrt(2 * l)
        outs = [("out_proj", w, p.weight) for w, p in enumerate(layer.attn.out_proj)]
        outs += [("fc2", e, ex.fc2.weight) for e, ex in enumerate(layer.ffn.experts)]
        for name, which, w in outs:
            got = w.std().item()
            tol = 5 * _rel_sampling_error(w.numel())
            rows.append((l, name, which, got, want))
            assert got == pytest.approx(want, rel=tol), (l, name, which, got, want)
            # cut at +-1 std before the division: nothing beyond 0.02 / sqrt(2 l)
            assert w.abs().max().item() <= STD / math.sqrt(2 * l) * (1 + 1e-6), (l, name)
    # every expert of every layer was counted: V, L (and VL in the top 3 layers of `shared`)
    experts = sum(len(layer.ffn.experts) for layer in model.beit3.layers)
    ways = len(model.beit3.layers[0].attn.out_proj) * cfg.layers
    assert len(rows) == experts + ways
    print("\nlayer  matrix    way/expert  std measured  0.02 t / sqrt(2l)")
    for l, name, which, got, want in rows:
        print(f"{l:5d}  {name:8s}  {which:10d}  {got:.6f}      {want:.6f}")


def test_everything_else_is_drawn_in_plus_minus_0_02(built):
    cfg, model = built
    for name, p in model.named_parameters():
        if name.endswith(("out_proj.0.weight", "out_proj.1.weight", "fc2.weight")):
            continue
        if "norm" in name:  # LayerNorms (also the Sub-LN ones): ones and zeros
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:  # q/k/v, fc1, heads, patch and text embeddings, position tables, CLS / mask
            assert p.abs().max().item() <= STD * (1 + 1e-6), name
            if p.numel() >= 4096:
                assert p.std().item() == pytest.approx(STD * T1, rel=5 * _rel_sampling_error(p.numel())), name


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_tp2_draws_the_tp1_weights(layout):
    """Each split layer draws its full matrix and keeps its slice: merged, the TP=2 ranks'
    weights are the TP=1 model's, bit for bit (no process group is needed to build them)."""
    cfg = _cfg(layout)
    torch.manual_seed(7)
    one = MaskedDataModel(cfg).state_dict()
    shards = []
    for rank in range(2):
        torch.manual_seed(7)
        shards.append(MaskedDataModel(cfg, TPGroup(None, rank, 2)).state_dict())
    merged = merge_tp(shards, cfg)
    assert sorted(merged) == sorted(one)
    for k, v in one.items():
        assert torch.equal(merged[k], v), k


def test_meta_device_and_subln_still_reachable():
    with torch.device("meta"):
        giant = MaskedDataModel(model_config("giant"))
    assert giant.beit3.layers[39].ffn.experts[2].fc2.weight.is_meta
    torch.manual_seed(0)
    sub = MaskedDataModel(_cfg("shared", init="subln"))
    w = sub.beit3.layers[11].attn.out_proj[0].weight
    # Sub-LN: cut at +-2 std, scaled by sqrt(log 24) whatever the layer
    want = STD * truncated_std_factor(2.0) * math.sqrt(math.log(24))
    assert w.std().item() == pytest.approx(want, rel=0.03)
