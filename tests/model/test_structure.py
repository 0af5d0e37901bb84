"""The model's structure against the paper: sizes of the giant, Sub-LN init scaling, drop path,
routing of the VL experts, and a gradient for every parameter whatever the batch holds."""
import math

import pytest
import torch

from megatron_style.config import model_config
from megatron_style.batch import pack_samples
from megatron_style.model import MaskedDataModel, MultiwayTransformer
from megatron_style.model.layout import TokenLayout, drop_path
from megatron_style.model.summary import parameter_groups
from megatron_style.batch.synthetic import random_batch, random_sample


def test_giant_matches_the_paper(giant_on_meta):
    """arXiv 2208.10442: V experts 692M, L experts 692M, VL experts 52M, shared attention
    317M, about 1.9B in all."""
    groups = parameter_groups(giant_on_meta)
    for name, paper in (("vision experts", 692e6), ("language experts", 692e6),
                        ("vision-language experts", 52e6), ("attention", 317e6)):
        assert abs(groups[name] / paper - 1) < 0.01, (name, groups[name])
    total = sum(groups.values())
    assert abs(total / 1.9e9 - 1) < 0.03, total


def test_every_parameter_is_in_a_summary_group():
    model = MaskedDataModel(model_config("tiny"))
    assert sum(parameter_groups(model).values()) == sum(p.numel() for p in model.parameters())


def _trunc_normal_std(std):
    """Standard deviation of N(0, std) truncated at +-2 std (the init's distribution)."""
    pdf2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    mass = math.erf(2 / math.sqrt(2))
    return std * math.sqrt(1 - 2 * 2 * pdf2 / mass)


def test_init_std_and_subln_scaling():
    """Weights ~ truncated N(0, init_std); fc1, fc2, v_proj and out_proj scaled by
    sqrt(log(2 * layers)) (Sub-LN / Magneto); LayerNorms 1 and 0, linear biases 0."""
    cfg = model_config("tiny", layers=6, dim=128, ffn_dim=256, heads=4, init_std=0.02,
                       init="subln")  # the paper's BEiT init: tests/model/test_beit_init.py
    model = MultiwayTransformer(cfg)
    scale = math.sqrt(math.log(2 * cfg.layers))
    base = _trunc_normal_std(cfg.init_std)
    for name, p in model.named_parameters():
        leaf = name.split(".")[-2] if name.endswith(("weight", "bias")) else ""
        if "norm" in name:
            want = 1.0 if name.endswith("weight") else 0.0
            assert torch.all(p == want), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        elif p.dim() == 2 and name.startswith("layers."):
            kind = name.split(".")[-3] if leaf.isdigit() else leaf
            want = base * (scale if kind in ("fc1", "fc2", "v_proj", "out_proj") else 1.0)
            assert abs(p.std().item() / want - 1) < 0.03, (name, p.std().item(), want)
            assert p.abs().max() <= 2 * cfg.init_std * (want / base) + 1e-7, name


def test_drop_path_rises_linearly_with_depth():
    cfg = model_config("tiny", layers=5, drop_path=0.2)
    rates = [block.drop_path for block in MultiwayTransformer(cfg).layers]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_drop_path_drops_whole_samples():
    lens = torch.tensor([3, 1, 4, 2] * 50)
    sample = torch.repeat_interleave(torch.arange(len(lens)), lens)
    layout = TokenLayout(route=None, route_vl=None, token_sample=sample, num_samples=len(lens))
    x = torch.ones(int(lens.sum()), 8)
    assert drop_path(x, 0.3, training=False, layout=layout) is x
    y = drop_path(x, 0.3, training=True, layout=layout)
    per_sample = [y[sample == s] for s in range(len(lens))]
    values = torch.stack([t[0, 0] for t in per_sample])
    assert all(torch.all(t == t[0, 0]) for t in per_sample)  # one draw per sample
    assert sorted(set(values.tolist())) == pytest.approx([0.0, 1 / 0.7])
    assert 0.15 < (values == 0).float().mean() < 0.45


def test_drop_path_in_a_block_is_per_sample():
    """In training, each branch of a block is either kept for all of a sample's tokens or
    dropped for all of them: with p near 1 some samples come out of the block unchanged."""
    cfg = model_config("tiny", layers=2, drop_path=0.95)
    block = MultiwayTransformer(cfg).layers[1].train()
    b = random_batch(cfg, images=8, texts=8, pairs=8, seed=1)
    model = MultiwayTransformer(cfg)
    x = torch.randn(b.num_tokens, cfg.dim)
    y = block(x, model.layout_packed(b))
    unchanged = torch.zeros(b.num_samples, dtype=torch.bool)
    for s in range(b.num_samples):
        rows = slice(int(b.cu_seqlens[s]), int(b.cu_seqlens[s + 1]))
        same = (y[rows] == x[rows]).all(dim=1)
        assert same.all() or not same.any(), f"sample {s} partly dropped"
        unchanged[s] = same.all()
    assert 0 < unchanged.sum() < b.num_samples


@pytest.mark.parametrize("layout", ["shared", "decoupled"])
@pytest.mark.parametrize("kinds", [(3, 0, 0), (0, 3, 0), (0, 0, 3), (2, 2, 0), (2, 0, 2)])
def test_every_parameter_gets_a_gradient(layout, kinds):
    """ZeRO reduces the same set of gradients on every rank: a batch without texts, images or
    pairs still gives every expert, way, embedding and head a (zero) gradient."""
    cfg = model_config("tiny", attention=layout, vl_layers=1 if layout == "shared" else 0)
    model = MaskedDataModel(cfg)
    model(random_batch(cfg, *kinds, seed=2)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    if kinds[1] == 0 and kinds[2] == 0:  # no text at all: the text embedding's gradient is 0
        assert torch.all(model.beit3.text_embed.weight.grad == 0)


def _outputs_by_kind(model, samples, batch):
    with torch.no_grad():
        out = model.encode(batch)
    cu = batch.cu_seqlens.tolist()
    return [out[cu[i]:cu[i + 1]] for i in range(len(samples))]


def test_vl_experts_serve_only_pair_tokens_in_the_top_layers(randomize):
    """Perturb one expert and see which samples change: the VL expert of a top layer moves
    only pairs; the vision expert of a top layer moves images but not pairs; the vision expert
    of a lower layer moves images and pairs; texts move with none of them."""
    cfg = model_config("tiny", layers=3, vl_layers=2, attention="shared")
    model = randomize(MultiwayTransformer(cfg), std=0.1).eval()
    assert [len(b.ffn.experts) for b in model.layers] == [2, 3, 3]
    g = torch.Generator().manual_seed(0)
    kinds = ["image", "text", "pair", "pair", "text", "image"]
    samples = [random_sample(cfg, k, 7, g) for k in kinds]
    batch = pack_samples(samples, cfg)
    before = _outputs_by_kind(model, samples, batch)

    def changed_kinds(param):
        saved = param.detach().clone()
        with torch.no_grad():
            param.add_(1.0)
            after = _outputs_by_kind(model, samples, batch)
            param.copy_(saved)  # exactly: w + 1 - 1 is not always w in floating point
        return {k for k, a, b in zip(kinds, before, after) if not torch.equal(a, b)}

    assert changed_kinds(model.layers[1].ffn.experts[2].fc1.weight) == {"pair"}
    assert changed_kinds(model.layers[2].ffn.experts[2].fc2.bias) == {"pair"}
    assert changed_kinds(model.layers[1].ffn.experts[0].fc1.weight) == {"image"}
    assert changed_kinds(model.layers[2].ffn.experts[1].fc1.weight) == {"text"}
    assert changed_kinds(model.layers[0].ffn.experts[0].fc1.weight) == {"image", "pair"}
    assert changed_kinds(model.layers[0].ffn.experts[1].fc1.weight) == {"text", "pair"}
