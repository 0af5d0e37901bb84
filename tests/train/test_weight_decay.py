"""Which parameters AdamW decays (optim.decay_embeddings). The paper does not say; the default
is unilm's choice in its BEiT, BEiT v2 and BEiT-3 code: only norms, biases, the CLS token and
the vision position table are exempt, so the text embedding, the text position table and the
mask token are decayed."""
from __future__ import annotations

import pytest

from megatron_style.config import model_config
from megatron_style.model import MaskedDataModel
from megatron_style.train.engine import param_groups

ALWAYS_EXEMPT = ("beit3.vision_embed.cls_token", "beit3.pos_vision.weight")
EMBEDDINGS = ("beit3.text_embed.weight", "beit3.pos_text.weight", "beit3.vision_embed.mask_token")


def _split(decay_embeddings):
    model = MaskedDataModel(model_config("tiny"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]}
              for g in param_groups(model, 0.05, decay_embeddings)}
    return model, groups


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_decay_groups(decay_embeddings):
    model, g = _split(decay_embeddings)
    assert set(ALWAYS_EXEMPT) <= g["no_decay"]
    assert (set(EMBEDDINGS) <= g["decay"]) if decay_embeddings else (set(EMBEDDINGS) <= g["no_decay"])
    for n, p in model.named_parameters():
        if p.ndim < 2:  # norms and biases
            assert n in g["no_decay"], n
    assert "beit3.layers.0.attn.q_proj.0.weight" in g["decay"] and "text_head.weight" in g["decay"]
    assert g["decay"] | g["no_decay"] == {n for n, _ in model.named_parameters()}


def test_default_is_unilms():
    from megatron_style.config import OptimConfig
    assert OptimConfig().decay_embeddings is True
