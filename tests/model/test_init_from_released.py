"""checkpoint.init_from takes any released BEiT-3 file: pretrained, ITC-tuned
(`beit3_*_itc_patch16_224.pth`: + logit_scale, vision_head, language_head), fine-tuned
(+ head.*, fc_norm.* / pooler.*), at any image size (the vision position table resized as
unilm's load_model_and_may_interpolate does: bicubic, size=, the 3 leading rows kept). The files
are written here in the released key layout; the report says what was ignored, resized and
created, and why."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_style.checkpoint.model_files import load_model_file
from megatron_style.config import model_config
from megatron_style.model import MaskedDataModel
from megatron_style.model.released_checkpoint import export_released_state_dict
from tests.train.launch import TINY, explain, pretrain, run_dirs

POS_A = "beit3.encoder.embed_positions.A.weight"
HEADS = ("mlm_head.", "mim_head.")


def _cfg(**kw):
    # released base's layout and patch, tiny widths
    sizes = dict(attention="decoupled", vl_layers=0, patch_size=16, img_size=224, dim=32,
                 ffn_dim=64, heads=2, max_text_len=62)
    return model_config("tiny", **{**sizes, **kw})


def released_file(path, img_size=224, extra=None):
    """A released pretrained file ({"model": beit3.* keys, no heads}) plus `extra` keys."""
    torch.manual_seed(1)
    sd = {k: v for k, v in export_released_state_dict(MaskedDataModel(_cfg(img_size=img_size))).items()
          if not k.startswith(HEADS)}
    sd.update(extra or {})
    torch.save({"model": sd}, path)
    return sd


def _loaded(model, sd, skip=()):
    mine = export_released_state_dict(model)
    for k, v in sd.items():
        if k in mine and k not in skip:
            assert torch.equal(mine[k], v), k


def test_itc_tuned_file(tmp_path):
    D = 32
    itc = {"logit_scale": torch.tensor(2.65), "vision_head.weight": torch.randn(D, D),
           "language_head.weight": torch.randn(D, D)}
    sd = released_file(tmp_path / "beit3_base_itc_patch16_224.pth", extra=itc)
    model = MaskedDataModel(_cfg())
    report = load_model_file(model, str(tmp_path / "beit3_base_itc_patch16_224.pth"))
    text = "\n".join(report)
    assert "released BEiT-3 layout" in report[0]
    assert "ignored logit_scale, vision_head.weight, language_head.weight" in text
    assert "image-text contrastive heads" in text
    assert "created image_head.bias, image_head.weight, text_head.bias, text_head.weight" in text
    assert "model.init=beit" in text and "interpolated" not in text
    _loaded(model, sd)


def test_classification_and_vqa_files(tmp_path):
    D = 32
    cls = {"fc_norm.weight": torch.ones(D), "fc_norm.bias": torch.zeros(D),
           "head.weight": torch.randn(1000, D), "head.bias": torch.zeros(1000)}
    sd = released_file(tmp_path / "cls.pth", extra=cls)
    model = MaskedDataModel(_cfg())
    text = "\n".join(load_model_file(model, str(tmp_path / "cls.pth")))
    assert "ignored fc_norm.weight, fc_norm.bias, head.weight, head.bias" in text
    assert "fine-tuning task's head" in text
    _loaded(model, sd)
    vqa = {"pooler.norm.weight": torch.ones(D), "pooler.dense.weight": torch.randn(D, D),
           "head.0.weight": torch.randn(2 * D, D), "head.3.weight": torch.randn(3129, 2 * D)}
    released_file(tmp_path / "vqa.pth", extra=vqa)
    text = "\n".join(load_model_file(MaskedDataModel(_cfg()), str(tmp_path / "vqa.pth")))
    assert "ignored pooler.norm.weight, pooler.dense.weight, head.0.weight, head.3.weight" in text


def test_384px_file_into_a_224px_model(tmp_path):
    sd = released_file(tmp_path / "beit3_base_patch16_384.pth", img_size=384)
    assert sd[POS_A].shape[0] == 3 + 24 * 24
    model = MaskedDataModel(_cfg())
    text = "\n".join(load_model_file(model, str(tmp_path / "beit3_base_patch16_384.pth")))
    assert f"interpolated {POS_A}: 24x24 -> 14x14 patches (579 -> 199 rows" in text
    got = model.beit3.pos_vision.weight.detach()
    assert torch.equal(got[:3], sd[POS_A][:3])        # fairseq's 2 unused rows and CLS
    # unilm: reshape(-1, 24, 24, D).permute(0, 3, 1, 2), bicubic to size (14, 14), no corners
    grid = sd[POS_A][3:].reshape(1, 24, 24, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False)
    assert torch.allclose(got[3:], want.permute(0, 2, 3, 1).flatten(1, 2)[0], atol=1e-6)
    _loaded(model, sd, skip=(POS_A,))


def test_what_cannot_fit_is_still_refused(tmp_path):
    released_file(tmp_path / "odd.pth", extra={"beit3.encoder.layers.0.self_attn.rel_pos.weight":
                                               torch.zeros(3)})
    with pytest.raises(ValueError, match="rel_pos"):
        load_model_file(MaskedDataModel(_cfg()), str(tmp_path / "odd.pth"))
    released_file(tmp_path / "patch8.pth")
    with pytest.raises(ValueError, match="shape mismatch"):  # another patch size: not resizable
        load_model_file(MaskedDataModel(_cfg(patch_size=8)), str(tmp_path / "patch8.pth"))


def test_the_run_logs_the_report(tmp_path):
    D = 32
    released_file(tmp_path / "itc.pth", img_size=384, extra={
        "logit_scale": torch.tensor(2.65), "vision_head.weight": torch.randn(D, D),
        "language_head.weight": torch.randn(D, D)})
    args = [*TINY, *run_dirs(tmp_path), "steps=1", "model.attention=decoupled", "model.vl_layers=0",
            "model.patch_size=16", "model.img_size=224", "model.dim=32", "model.ffn_dim=64",
            "model.heads=2", "model.max_text_len=62", f"checkpoint.init_from={tmp_path / 'itc.pth'}",
            "checkpoint.save=false"]
    p = pretrain(args)
    assert p.returncode == 0, explain(p)
    out = p.stdout + p.stderr
    for line in ("released BEiT-3 layout", "ignored logit_scale", "interpolated " + POS_A,
                 "created image_head"):
        assert line in out, explain(p)
