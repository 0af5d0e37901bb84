import math

import pytest
import torch
import torch.nn.functional as F

from megatron_style.config import ConfigError
from megatron_style.data.build_tokenizers import build_visual_tokenizer
from megatron_style.data.visual_tokenizers import (KMeansTokenizer, PixelTargets, load_vqkd,
                                                   patchify, tokenizer_input_size,
                                                   train_kmeans_tokenizer)

DIM, DEPTH, HIDDEN, PATCH, CODES, CODE_DIM = 128, 2, 256, 16, 64, 8   # heads = DIM // 64 = 2


def vqkd_state(grid=2, seed=0):
    """A tiny VQ-KD checkpoint written key by key in BEiT v2's layout (what
    modeling_vqkd.VQKD.state_dict() holds), with the parts a tokenizer ignores."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd = {"encoder.patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH),
          "encoder.patch_embed.proj.bias": r(DIM),
          "encoder.cls_token": r(1, 1, DIM), "encoder.pos_embed": r(1, grid * grid + 1, DIM)}
    for i in range(DEPTH):
        b = f"encoder.blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(DIM), b + "norm1.bias": r(DIM),
                   b + "attn.qkv.weight": r(3 * DIM, DIM), b + "attn.q_bias": r(DIM),
                   b + "attn.v_bias": r(DIM), b + "attn.proj.weight": r(DIM, DIM),
                   b + "attn.proj.bias": r(DIM), b + "norm2.weight": 1 + r(DIM),
                   b + "norm2.bias": r(DIM), b + "mlp.fc1.weight": r(HIDDEN, DIM),
                   b + "mlp.fc1.bias": r(HIDDEN), b + "mlp.fc2.weight": r(DIM, HIDDEN),
                   b + "mlp.fc2.bias": r(DIM)})
    sd.update({"encoder.fc_norm.weight": 1 + r(DIM), "encoder.fc_norm.bias": r(DIM),
               "encode_task_layer.0.weight": r(DIM, DIM), "encode_task_layer.0.bias": r(DIM),
               "encode_task_layer.2.weight": r(CODE_DIM, DIM), "encode_task_layer.2.bias": r(CODE_DIM),
               "quantize.embedding.weight": F.normalize(r(CODES, CODE_DIM), dim=-1),
               # not needed for tokenizing: must be skipped
               "quantize.embedding.cluster_size": torch.ones(CODES),
               "quantize.embedding.embed_avg": r(CODES, CODE_DIM),
               "quantize.embedding.initted": torch.ones(1), "quantize.cluster_size": torch.ones(CODES),
               "decoder.cls_token": r(1, 1, DIM), "decoder.blocks.0.norm1.weight": r(DIM),
               "decode_task_layer.0.weight": r(DIM, DIM)})
    return sd


def reference_ids(sd, x01):
    """BEiT v2's get_codebook_indices, written out plainly."""
    x = x01 * 255.0 / 127.5 - 1.0
    x = F.conv2d(x, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["encoder.cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["encoder.pos_embed"]
    H = DIM // 64
    for i in range(DEPTH):
        p = lambda n: sd[f"encoder.blocks.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(x, (DIM,), p("norm1.weight"), p("norm1.bias"), 1e-6)
        bias = torch.cat([p("attn.q_bias"), torch.zeros(DIM), p("attn.v_bias")])
        qkv = (h @ p("attn.qkv.weight").t() + bias).reshape(*h.shape[:2], 3, H, DIM // H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = ((q / math.sqrt(DIM // H)) @ k.transpose(-1, -2)).softmax(-1) @ v
        x = x + a.transpose(1, 2).reshape(h.shape) @ p("attn.proj.weight").t() + p("attn.proj.bias")
        h = F.layer_norm(x, (DIM,), p("norm2.weight"), p("norm2.bias"), 1e-6)
        m = F.gelu(h @ p("mlp.fc1.weight").t() + p("mlp.fc1.bias"))
        x = x + m @ p("mlp.fc2.weight").t() + p("mlp.fc2.bias")
    f = F.layer_norm(x[:, 1:], (DIM,), sd["encoder.fc_norm.weight"], sd["encoder.fc_norm.bias"], 1e-6)
    z = torch.tanh(f @ sd["encode_task_layer.0.weight"].t() + sd["encode_task_layer.0.bias"])
    z = F.normalize(z @ sd["encode_task_layer.2.weight"].t() + sd["encode_task_layer.2.bias"], dim=-1)
    e = sd["quantize.embedding.weight"]
    d = (z ** 2).sum(-1, keepdim=True) + (e ** 2).sum(-1) - 2 * z @ e.t()
    return d.argmin(-1)


def test_vqkd_loads_released_layout_and_matches_reference(tmp_path):
    sd = vqkd_state(grid=2)
    path = tmp_path / "vqkd.pth"
    torch.save({"model": sd}, path)
    tok = load_vqkd(str(path))
    assert tok.vocab_size == CODES and tok.input_size == 32 and not tok.needs_tokenizer_images
    x = torch.rand(3, 3, 32, 32)
    ids = tok(x * 2 - 1, x)            # model view in [-1, 1], tokenizer view in [0, 1]
    assert ids.shape == (3, 4) and ids.dtype == torch.long
    assert torch.equal(ids, reference_ids(sd, x))
    assert torch.equal(tok(x * 2 - 1), ids)   # same resolution: the model's view suffices
    model_view = x * 2 - 1
    assert torch.equal(tok(model_view, model_view), ids)   # the same tensor twice: model's view
    assert len(set(ids.flatten().tolist())) > 1
    assert not any(p.requires_grad for p in tok.parameters())


def test_vqkd_other_grid_resizes_positions_and_needs_tokenizer_images(tmp_path, tiny_pretrain):
    path = tmp_path / "vqkd.pth"
    torch.save({"model": vqkd_state(grid=2)}, path)
    cfg = tiny_pretrain("data.tokenizer.visual=vqkd", f"data.tokenizer.visual_model={path}",
                        f"model.visual_vocab_size={CODES}")
    assert tokenizer_input_size(cfg) == 64     # tiny: 4x4 grid of patch 8 -> 4 x 16 px
    tok = build_visual_tokenizer(cfg)
    assert tok.needs_tokenizer_images and tok.input_size == 64
    ids = tok(torch.zeros(2, 3, 32, 32), torch.rand(2, 3, 64, 64))
    assert ids.shape == (2, 16) and 0 <= int(ids.min()) and int(ids.max()) < CODES
    with pytest.raises(ValueError, match="tokenizer_images"):
        tok(torch.zeros(2, 3, 32, 32))
    small = tiny_pretrain("data.tokenizer.visual=vqkd", f"data.tokenizer.visual_model={path}",
                          "model.visual_vocab_size=16")
    with pytest.raises(ConfigError, match="model.visual_vocab_size"):
        build_visual_tokenizer(small)


def test_vqkd_missing_and_unexpected_keys(tmp_path):
    sd = vqkd_state()
    del sd["encoder.blocks.1.attn.q_bias"]
    torch.save({"model": sd}, tmp_path / "missing.pth")
    with pytest.raises(KeyError, match="encoder.blocks.1.attn.q_bias"):
        load_vqkd(str(tmp_path / "missing.pth"))
    torch.save({"model": {"encoder.cls_token": torch.zeros(1, 1, 8)}}, tmp_path / "other.pth")
    with pytest.raises(KeyError, match="not a VQ-KD checkpoint"):
        load_vqkd(str(tmp_path / "other.pth"))
    sd = vqkd_state()
    sd["encoder.blocks.0.attn.relative_position_bias_table"] = torch.zeros(3, 2)
    torch.save(sd, tmp_path / "relpos.pth")   # also: no "model" wrapper
    with pytest.raises(KeyError, match="relative_position_bias_table"):
        load_vqkd(str(tmp_path / "relpos.pth"))
    with pytest.raises(FileNotFoundError):
        load_vqkd(str(tmp_path / "nope.pth"))


def colour_patch_images(n=64, grid=4, patch=8, seed=0):
    """Images whose patches are flat, one of 5 colours each."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.tensor([[-1, -1, -1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1.0]])
    which = torch.randint(0, 5, (n, grid, grid), generator=g)
    img = palette[which].permute(0, 3, 1, 2)
    img = img.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return img + 0.01 * torch.randn(img.shape, generator=g), which.reshape(n, -1)


def test_kmeans_trains_assigns_and_round_trips(tmp_path):
    imgs, which = colour_patch_images()
    tok = train_kmeans_tokenizer(iter(imgs), patch_size=8, k=5, seed=0)
    ids = tok(imgs)
    assert ids.shape == (64, 16) and tok.vocab_size == 5 and tok.input_size == 32
    # one code per colour: the clustering recovers the palette exactly
    for c in range(5):
        assert len(set(ids[which == c].tolist())) == 1
    assert len(set(ids.flatten().tolist())) == 5
    tok.save(str(tmp_path / "km.pt"))
    tok2 = KMeansTokenizer.load(str(tmp_path / "km.pt"))
    assert torch.equal(tok2(imgs), ids)
    torch.save({"centroids": torch.zeros(2, 2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a k-means tokenizer"):
        KMeansTokenizer.load(str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="at least k=100"):
        train_kmeans_tokenizer(iter(imgs[:2]), patch_size=8, k=100)


def test_pixel_targets_normalised_per_patch():
    x = torch.rand(2, 3, 32, 32) * 3 + 1
    t = PixelTargets(8, 32)(x)
    assert t.shape == (2, 16, 8 * 8 * 3) and t.dtype == torch.float32
    assert t.mean(-1).abs().max() < 1e-4 and (t.var(-1, unbiased=False) - 1).abs().max() < 1e-3
    p = patchify(x, 8)
    assert torch.equal(p[1, 5], x[1, :, 8:16, 8:16].permute(1, 2, 0).reshape(-1))   # (row, col, ch)


def test_visual_target_and_tokenizer_must_agree(tiny_pretrain):
    with pytest.raises(ConfigError, match="visual_target"):
        build_visual_tokenizer(tiny_pretrain("data.tokenizer.visual=pixels"))
    with pytest.raises(ConfigError, match="visual_target"):
        build_visual_tokenizer(tiny_pretrain("model.visual_target=pixels"))
    tok = build_visual_tokenizer(tiny_pretrain("model.visual_target=pixels", "data.tokenizer.visual=pixels"))
    assert tok.vocab_size is None and tok(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 192)
    with pytest.raises(ConfigError, match="data.tokenizer.visual_model"):
        build_visual_tokenizer(tiny_pretrain("data.source=shards", "data.image.shards=/x/{0..1}.tar",
                                             "data.text.shards=/x/t.tar", "data.pair.shards=/x/p.tar"))
