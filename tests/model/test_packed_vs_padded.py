"""The packed stream (images, texts and pairs interleaved, no padding) gives every sample the
same outputs as the reference layout (encode_padded, one kind per batch, padded texts), in
both attention layouts; the shared one with VL experts in its top layer."""
import pytest
import torch

from megatron_style.config import model_config
from megatron_style.batch import KIND_NAMES, pack_samples
from megatron_style.batch.synthetic import random_sample
from megatron_style.model.transformer import MultiwayTransformer

TOL = 1e-5
MIXED = (["image", "text", "pair", "text", "image", "pair", "pair", "text", "image"],
         [0, 5, 9, 17, 0, 3, 12, 1, 0])
# One kind, one length: the packed stream is then an [S, L] batch (attention's shortcut).
IMAGES = (["image"] * 3, [0] * 3)
PAIRS = (["pair"] * 3, [6] * 3)


def _padded_outputs(model, samples, kind):
    """encode_padded on the samples of one kind; returns each sample's rows without padding."""
    chosen = [s for s in samples if KIND_NAMES[s.kind] == kind]
    images = image_mask = text = pad = None
    if kind != "text":
        images = torch.stack([s.image for s in chosen])
        image_mask = torch.stack([s.image_mask for s in chosen])
    if kind != "image":
        lens = [int(s.text.shape[0]) for s in chosen]
        text = torch.full((len(chosen), max(lens)), 1, dtype=torch.long)
        for i, s in enumerate(chosen):
            text[i, :lens[i]] = s.text
        pad = torch.arange(max(lens)).unsqueeze(0) >= torch.tensor(lens).unsqueeze(1)
    out = model.encode_padded(images=images, text_ids=text, text_padding_mask=pad,
                              image_mask=image_mask)
    rows = []
    for i, s in enumerate(chosen):
        n_img = model.cfg.image_tokens if kind != "text" else 0
        n_txt = int(s.text.shape[0]) if kind != "image" else 0
        rows.append(out[i, :n_img + n_txt])
    return rows


@pytest.mark.parametrize("layout", ["shared", "decoupled"])
@pytest.mark.parametrize("batch_kinds", [MIXED, IMAGES, PAIRS], ids=["mixed", "images", "pairs"])
def test_packed_equals_padded_per_kind(layout, batch_kinds, randomize):
    kinds, text_lens = batch_kinds
    cfg = model_config("tiny", attention=layout, vl_layers=1 if layout == "shared" else 0,
                       kernels="reference")
    model = randomize(MultiwayTransformer(cfg), std=0.1).eval()
    g = torch.Generator().manual_seed(0)
    samples = [random_sample(cfg, k, max(n, 1), g) for k, n in zip(kinds, text_lens)]
    batch = pack_samples(samples, cfg)
    with torch.no_grad():
        packed = model.encode(batch)
        expected = {k: iter(_padded_outputs(model, samples, k)) for k in set(kinds)}
    cu = batch.cu_seqlens.tolist()
    for j, kind in enumerate(kinds):
        want = next(expected[kind])
        got = packed[cu[j]:cu[j + 1]]
        assert got.shape == want.shape
        err = (got - want).abs().max().item()
        assert err < TOL, f"{layout}: sample {j} ({kind}) differs by {err:.2e}"
