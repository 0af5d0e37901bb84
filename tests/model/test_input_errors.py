"""Bad input is refused with a ValueError that names the problem, before any computation."""
import dataclasses

import pytest
import torch

from megatron_style.config import model_config
from megatron_style.batch import Sample, pack_samples
from megatron_style.model import MultiwayTransformer
from megatron_style.batch import Route
from megatron_style.batch.synthetic import random_batch


@pytest.fixture(scope="module")
def model():
    return MultiwayTransformer(model_config("tiny")).eval()  # 32px images, patch 8, vocab 1000


def _long(*shape, value=0):
    return torch.full(shape, value, dtype=torch.long)


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=torch.randn(2, 3, 16, 16)), "16x16; the model takes 32x32"),
    (dict(images=torch.randn(2, 1, 32, 32)), "1 channels; the model takes 3"),
    (dict(images=torch.randn(0, 3, 32, 32)), "non-empty"),
    (dict(text_ids=_long(2, 65)), "65 tokens; .* at most max_text_len=64"),
    (dict(text_ids=_long(2, 3, value=1000)), r"token id 1000 is out of the text vocabulary \[0, 1000\)"),
    (dict(text_ids=_long(2, 3, value=-1)), "token id -1 is out of the text vocabulary"),
    (dict(), "empty batch"),
    (dict(images=torch.randn(2, 3, 32, 32), text_ids=_long(3, 4)), "2 images but 3 texts"),
    (dict(images=torch.randn(2, 3, 32, 32), image_mask=torch.zeros(2, 5, dtype=torch.bool)),
     r"image_mask has shape \(2, 5\), expected \(2, 16\)"),
    (dict(text_ids=_long(2, 4), text_padding_mask=torch.zeros(2, 3, dtype=torch.bool)),
     "text_padding_mask has shape"),
])
def test_padded_inputs(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.encode_padded(**kwargs)


def _packed(model, sample):
    return model.encode(pack_samples([sample], model.cfg))


@pytest.mark.parametrize("sample, match", [
    (Sample(image=torch.randn(3, 16, 16)), r"\(1, 3, 16, 16\); the model takes \[n, 3, 32, 32\]"),
    (Sample(image=torch.randn(1, 32, 32)), r"\(1, 1, 32, 32\); the model takes \[n, 3, 32, 32\]"),
    (Sample(text=_long(65)), "65 tokens; the position table takes at most max_text_len=64"),
    (Sample(text=torch.tensor([5, 1000])), r"token id 1000 is out of the text vocabulary \[0, 1000\)"),
    (Sample(text=torch.tensor([-3, 5])), "token id -3 is out of the text vocabulary"),
    (Sample(text=_long(0)), "empty text"),
    (Sample(), "a sample needs an image, a text, or both"),
    (Sample(image=torch.randn(3, 32, 32), image_mask=torch.zeros(5, dtype=torch.bool)),
     r"image_mask has shape \(5,\), expected \(16,\)"),
])
def test_packed_samples(model, sample, match):
    with pytest.raises(ValueError, match=match):
        _packed(model, sample)


def test_empty_sample_list(model):
    with pytest.raises(ValueError, match="empty batch"):
        pack_samples([], model.cfg)


def _corruptions(b):
    """(name, corrupted batch, message) for packing metadata that does not fit together."""
    T, S = b.num_tokens, b.num_samples
    r, rvl = b.route, b.route_vl
    swapped = r.perm.clone()
    swapped[[0, -1]] = swapped[[-1, 0]]  # one vision and one language position trade places
    return [
        ("cu_seqlens length", dict(cu_seqlens=b.cu_seqlens[:-1]), f"cu_seqlens has {S} entries for {S} samples"),
        ("cu_seqlens order", dict(cu_seqlens=b.cu_seqlens.flip(0)), "cu_seqlens must rise strictly from 0"),
        ("cu_seqlens end", dict(cu_seqlens=torch.cat([b.cu_seqlens[:-1], b.cu_seqlens[-1:] - 1])),
         f"rise strictly from 0 to {T}"),
        ("max_seqlen", dict(max_seqlen=1), "max_seqlen 1 < longest sample"),
        ("token_source length", dict(token_source=b.token_source[:-1]), "inconsistent packing"),
        ("token_source values", dict(token_source=b.token_source + T), "token_source values must be rows"),
        ("token_sample", dict(token_sample=b.token_sample.roll(1)), "token_sample does not number"),
        ("sample_kind", dict(sample_kind=(b.sample_kind + 1) % 3), "is marked"),
        ("route counts", dict(route=Route(r.perm, r.inv, (r.counts[0] + 1, r.counts[1] - 1))),
         "route counts"),
        ("route perm", dict(route=Route(swapped, r.inv, r.counts)), "route.perm must list"),
        ("route_vl groups", dict(route_vl=r), "route_vl counts"),
        ("route_vl inv", dict(route_vl=Route(rvl.perm, rvl.inv.roll(1), rvl.counts)), "route_vl.perm"),
        ("text_pos", dict(text_pos=b.text_pos - 2), "text_pos counts from 2"),
        ("image_mask", dict(image_mask=b.image_mask[:, :3]), "image_mask has shape"),
        ("targets", dict(text_target_pos=b.text_target_pos[:-1]), "text_target_pos and text_targets"),
    ]


@pytest.fixture(scope="module")
def mixed_batch(model):
    b = random_batch(model.cfg, images=2, texts=2, pairs=2, seed=3)
    model.encode(b)  # the uncorrupted batch is fine
    return b


CORRUPTIONS = [c[0] for c in _corruptions(random_batch(model_config("tiny"), 1, 1, 1))]


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_inconsistent_packing_metadata(model, mixed_batch, name):
    change, match = {n: (c, m) for n, c, m in _corruptions(mixed_batch)}[name]
    with pytest.raises(ValueError, match=match):
        model.encode(dataclasses.replace(mixed_batch, **change))
