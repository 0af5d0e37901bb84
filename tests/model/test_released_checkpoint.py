"""Import / export of the released BEiT-3 checkpoint layout (torchscale's key names)."""
import pytest
import torch

from megatron_style.config import model_config
from megatron_style.model import MaskedDataModel, MultiwayTransformer
from megatron_style.model.released_checkpoint import (
    export_released_state_dict,
    load_released_state_dict,
)

HEADS = ("mlm_head.", "mim_head.")


@pytest.fixture(scope="module")
def cfg():
    return model_config("tiny", attention="decoupled", vl_layers=0, layers=2)


@pytest.fixture(scope="module")
def released(cfg):
    """A released-layout state dict (with heads) whose values are not any model's init."""
    with torch.device("meta"):
        names = export_released_state_dict(MaskedDataModel(cfg))
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) for k, v in names.items()}


def _variant(sd, heads: bool, prefix: bool, wrapper: bool):
    out = {}
    for k, v in sd.items():
        if k.startswith(HEADS):
            if heads:
                out[k] = v
        else:
            out[k if prefix else k[len("beit3."):]] = v
    return {"model": out} if wrapper else out


@pytest.mark.parametrize("heads", [True, False])
@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("wrapper", [True, False])
def test_import_then_export_reproduces_every_tensor(cfg, released, heads, prefix, wrapper):
    model = MaskedDataModel(cfg)
    load_released_state_dict(model, _variant(released, heads, prefix, wrapper))
    back = export_released_state_dict(model, with_heads=heads)
    want = _variant(released, heads, prefix=True, wrapper=False)
    assert sorted(back) == sorted(want)
    for k, v in want.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_round_trip_through_a_bare_encoder(cfg, released):
    enc = MultiwayTransformer(cfg)
    load_released_state_dict(enc, released)  # heads in the file are not the encoder's business
    back = export_released_state_dict(enc)
    want = _variant(released, heads=False, prefix=True, wrapper=False)
    assert sorted(back) == sorted(want)
    assert all(torch.equal(back[k], v) for k, v in want.items())


def test_keys_and_shapes_are_torchscales(cfg, torchscale_beit3):
    BEiT3, EncoderConfig = torchscale_beit3
    args = EncoderConfig(img_size=cfg.img_size, patch_size=cfg.patch_size,
                         vocab_size=cfg.text_vocab_size, multiway=True, layernorm_embedding=False,
                         normalize_output=True, no_output_layer=True, encoder_embed_dim=cfg.dim,
                         encoder_attention_heads=cfg.heads, encoder_ffn_embed_dim=cfg.ffn_dim,
                         encoder_layers=cfg.layers, max_source_positions=cfg.max_text_len + 2)
    ref = {f"beit3.{k}": tuple(v.shape) for k, v in BEiT3(args).state_dict().items()}
    with torch.device("meta"):
        ours = export_released_state_dict(MultiwayTransformer(cfg))
    assert {k: tuple(v.shape) for k, v in ours.items()} == ref


def test_error_lists_missing_unexpected_and_misshaped_keys(cfg, released):
    sd = dict(released)
    del sd["beit3.encoder.layers.1.ffn.B.fc2.weight"]
    sd["beit3.encoder.layers.0.self_attn.rel_pos.weight"] = torch.zeros(3)
    sd["beit3.encoder.embed_positions.B.weight"] = torch.zeros(7, cfg.dim)
    with pytest.raises(ValueError) as e:
        load_released_state_dict(MaskedDataModel(cfg), {"model": sd})
    msg = str(e.value)
    assert "missing (1): beit3.encoder.layers.1.ffn.B.fc2.weight" in msg
    assert "unexpected (1): beit3.encoder.layers.0.self_attn.rel_pos.weight" in msg
    assert (f"beit3.encoder.embed_positions.B.weight: file (7, {cfg.dim}) vs model "
            f"({cfg.max_text_len + 2}, {cfg.dim})") in msg


def test_heads_can_be_required(cfg, released):
    with pytest.raises(ValueError, match=r"missing \(4\): mim_head.bias, mim_head.weight, mlm_head"):
        load_released_state_dict(MaskedDataModel(cfg), _variant(released, False, True, False),
                                 require_heads=True)


def test_shared_layout_is_refused(released):
    shared = MaskedDataModel(model_config("tiny", attention="shared", vl_layers=0))
    with pytest.raises(ValueError, match="attention=decoupled"):
        load_released_state_dict(shared, released)
    with pytest.raises(ValueError, match="decoupled"):
        export_released_state_dict(shared)
