"""FLOPs from the built model: checked against the matmuls PyTorch actually runs
(torch.utils.flop_counter), against the parameter counts, and across the per-sample and
per-batch paths."""
import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron_style.config import model_config
from megatron_style.model import MaskedDataModel
from megatron_style.batch import KIND_NAMES
from megatron_style.model.flops import (
    batch_flops,
    build_on_meta,
    flop_constants,
    flops_per_token_by_expert,
    sample_flops,
)
from megatron_style.model.summary import parameter_groups
from megatron_style.batch.synthetic import random_batch

LAYOUTS = [dict(attention="shared", vl_layers=1), dict(attention="decoupled", vl_layers=0)]


def _sum_len2(batch):
    lens = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
    return float(lens.double().pow(2).sum())


@pytest.mark.parametrize("layout", LAYOUTS, ids=["shared", "decoupled"])
def test_forward_flops_match_the_matmuls_pytorch_runs(layout):
    cfg = model_config("tiny", layers=3, **layout)
    model = MaskedDataModel(cfg)
    batch = random_batch(cfg, images=2, texts=3, pairs=2, seed=0)
    # The math backend runs attention as two bmm's the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(batch)
    ops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    c = flop_constants(model)
    predicted = batch_flops(model, batch, training=False)
    attention = c.attention_per_len2 * _sum_len2(batch)
    matmuls = ops.pop("aten.mm", 0) + ops.pop("aten.addmm", 0) + ops.pop("aten.convolution", 0)
    assert predicted - attention == matmuls
    # The reference varlen attention pads every sample to the longest, which the counter sees.
    assert ops.pop("aten.bmm") == c.attention_per_len2 * batch.num_samples * batch.max_seqlen ** 2
    assert not ops, f"matmuls the FLOP count does not know about: {ops}"
    assert batch_flops(model, batch) == 3 * predicted


@pytest.mark.parametrize("layout", LAYOUTS, ids=["shared", "decoupled"])
def test_batch_flops_is_the_sum_of_its_samples(layout):
    cfg = model_config("tiny", layers=3, **layout)
    model = build_on_meta(cfg)
    batch = random_batch(cfg, images=3, texts=2, pairs=4, text_lens=(2, 30), seed=1)
    cu = batch.cu_seqlens.tolist()
    stream = torch.zeros(batch.num_tokens, dtype=torch.long)
    stream[batch.text_target_pos] = 1
    stream[batch.image_target_pos] = 2
    total = 0.0
    for s, kind in enumerate(batch.sample_kind.tolist()):
        rows = stream[cu[s]:cu[s + 1]]
        n_img = cfg.image_tokens if KIND_NAMES[kind] != "text" else 0
        total += sample_flops(model, KIND_NAMES[kind], text_len=cu[s + 1] - cu[s] - n_img,
                              masked_text=int((rows == 1).sum()), masked_patches=int((rows == 2).sum()))
    assert batch_flops(model, batch) == pytest.approx(total, rel=1e-12)


def test_giant_per_token_flops_follow_the_parameter_counts(giant_on_meta):
    """2 FLOPs per weight: a token's vision-expert FLOPs over all layers ~ 2 x 692M."""
    model = giant_on_meta
    per_token = flops_per_token_by_expert(model)
    groups = parameter_groups(model)
    for key, group in (("vision", "vision experts"), ("language", "language experts"),
                       ("vision_language", "vision-language experts"), ("attention_vision", "attention")):
        # the groups also hold biases and LayerNorms (< 0.2%)
        assert per_token[key] == pytest.approx(2 * groups[group], rel=2e-3), key
    assert per_token["text_head"] == 2 * 1408 * 64010


def test_sample_flops_from_a_config_equals_from_the_model():
    cfg = model_config("tiny", layers=3, vl_layers=2)
    model = build_on_meta(cfg)
    for kind in ("image", "text", "pair"):
        assert sample_flops(cfg, kind, text_len=9) == sample_flops(model, kind, text_len=9)
    # a pair costs more than its image and its text apart (attention is quadratic)
    assert sample_flops(model, "pair", 9) > sample_flops(model, "image") + sample_flops(model, "text", 9)


def test_a_batch_still_waiting_for_its_visual_targets_counts_the_same():
    """The trainer may count the loader's CPU batch, whose visual targets are computed later
    on the device: the masked positions are what counts."""
    cfg = model_config("tiny")
    model = build_on_meta(cfg)
    batch = random_batch(cfg, images=2, texts=1, pairs=2, seed=4)
    pending = dataclasses.replace(batch, image_targets=batch.image_targets[:0],
                                  image_targets_pending=True)
    assert batch_flops(model, pending) == batch_flops(model, batch)


def test_constants_are_computed_once_and_wrappers_are_seen_through():
    model = build_on_meta(model_config("tiny"))
    assert flop_constants(model) is flop_constants(model)

    class Engine(torch.nn.Module):  # e.g. a DeepSpeed engine or DDP
        def __init__(self, module):
            super().__init__()
            self.module = module

    batch = random_batch(model_config("tiny"), 1, 1, 1)
    assert batch_flops(Engine(model), batch) == batch_flops(model, batch)


def test_bad_arguments():
    model = build_on_meta(model_config("tiny"))
    with pytest.raises(ValueError, match="kind 'video'"):
        sample_flops(model, "video")
    with pytest.raises(ValueError, match="text_len 65 must be in"):
        sample_flops(model, "text", text_len=65)
    with pytest.raises(TypeError, match="MaskedDataModel or MultiwayTransformer"):
        flop_constants(torch.nn.Linear(2, 2))
