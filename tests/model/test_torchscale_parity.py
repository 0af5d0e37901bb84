"""Same weights, same inputs: our `decoupled` model equals microsoft/torchscale's BEiT3 (the
code behind the released checkpoints) within 1e-5 in fp32, in the reference layout
(encode_padded) and packed (pack_samples + encode), for images, padded texts and pairs."""
import pytest
import torch

from megatron_style.config import model_config
from megatron_style.batch import Sample, pack_samples
from megatron_style.model.released_checkpoint import load_released_state_dict
from megatron_style.model.transformer import MultiwayTransformer

# Base-like widths (768 / 12 heads / 3072, 224px at patch 16) with 2 layers; a smaller text
# vocabulary keeps the two embedding tables cheap to build.
LAYERS, DIM, HEADS, FFN, IMG, PATCH, VOCAB, MAX_TEXT = 2, 768, 12, 3072, 224, 16, 1000, 40
TOL = 1e-5
B, LT = 3, 20
TEXT_LENS = (20, 13, 7)  # per sample: the rest of the LT columns is padding


@pytest.fixture(scope="module")
def models(torchscale_beit3, randomize):
    BEiT3, EncoderConfig = torchscale_beit3
    torch.manual_seed(0)
    args = EncoderConfig(img_size=IMG, patch_size=PATCH, vocab_size=VOCAB, multiway=True,
                         layernorm_embedding=False, normalize_output=True, no_output_layer=True,
                         encoder_embed_dim=DIM, encoder_attention_heads=HEADS,
                         encoder_ffn_embed_dim=FFN, encoder_layers=LAYERS,
                         max_source_positions=MAX_TEXT + 2)
    ref = randomize(BEiT3(args), std=0.1).eval()
    cfg = model_config("base", layers=LAYERS, dim=DIM, heads=HEADS, ffn_dim=FFN, img_size=IMG,
                       patch_size=PATCH, text_vocab_size=VOCAB, max_text_len=MAX_TEXT,
                       kernels="reference")
    # Every tensor comes from the file: build without initialising (meta), then allocate.
    with torch.device("meta"):
        ours = MultiwayTransformer(cfg)
    ours = ours.to_empty(device="cpu").eval()
    released = {"model": {f"beit3.{k}": v.clone() for k, v in ref.state_dict().items()}}
    load_released_state_dict(ours, released)
    return ref, ours


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, IMG, IMG, generator=g)
    num_patches = (IMG // PATCH) ** 2
    image_mask = torch.rand(B, num_patches, generator=g) < 0.4
    text = torch.randint(0, VOCAB, (B, LT), generator=g)
    pad = torch.arange(LT).unsqueeze(0) >= torch.tensor(TEXT_LENS).unsqueeze(1)
    return images, image_mask, text, pad


@pytest.fixture(scope="module")
def expected(models, inputs):
    ref = models[0]
    images, image_mask, text, pad = inputs
    with torch.no_grad():
        return {
            "image": ref(visual_tokens=images, vision_masked_position=image_mask)["encoder_out"],
            "text": ref(textual_tokens=text, text_padding_position=pad)["encoder_out"],
            "pair": ref(visual_tokens=images, textual_tokens=text, text_padding_position=pad,
                        vision_masked_position=image_mask)["encoder_out"],
        }


def _valid(kind, pad):
    """[B, L] positions that are tokens, not padding."""
    img = torch.ones(B, (IMG // PATCH) ** 2 + 1, dtype=torch.bool)
    return {"image": img, "text": ~pad, "pair": torch.cat([img, ~pad], 1)}[kind]


def test_padded_layout_matches_torchscale(models, inputs, expected):
    ours = models[1]
    images, image_mask, text, pad = inputs
    with torch.no_grad():
        got = {"image": ours.encode_padded(images=images, image_mask=image_mask),
               "text": ours.encode_padded(text_ids=text, text_padding_mask=pad),
               "pair": ours.encode_padded(images=images, text_ids=text, text_padding_mask=pad,
                                          image_mask=image_mask)}
    for kind in expected:
        valid = _valid(kind, pad)
        assert got[kind].shape == expected[kind].shape, kind
        err = (got[kind] - expected[kind])[valid].abs().max().item()
        assert err < TOL, f"{kind}: max |ours - torchscale| = {err:.2e}"
        # the outputs are not trivially equal (e.g. all zero or saturated)
        assert expected[kind][valid].std() > 0.01


def test_packed_layout_matches_torchscale(models, inputs, expected):
    """The same samples packed into one stream (images, texts and pairs interleaved, texts
    without their padding) give each sample the reference's outputs."""
    ours = models[1]
    images, image_mask, text, pad = inputs
    num_patches = image_mask.shape[1]
    samples, order = [], []
    for i in range(B):
        txt = text[i, :TEXT_LENS[i]]
        for kind in ("image", "text", "pair"):
            s = Sample(image=images[i] if kind != "text" else None,
                       text=txt if kind != "image" else None)
            if s.image is not None:
                s.image_mask = image_mask[i]
                s.image_targets = torch.zeros(num_patches, dtype=torch.long)
            samples.append(s)
            order.append((kind, i))
    batch = pack_samples(samples, ours.cfg)
    with torch.no_grad():
        out = ours.encode(batch)
    cu = batch.cu_seqlens.tolist()
    for j, (kind, i) in enumerate(order):
        want = expected[kind][i][_valid(kind, pad)[i]]
        got = out[cu[j]:cu[j + 1]]
        assert got.shape == want.shape, (kind, i)
        err = (got - want).abs().max().item()
        assert err < TOL, f"packed {kind} sample {i}: max |ours - torchscale| = {err:.2e}"
