"""configs/model/*.yaml are dumps of config.MODEL_PRESETS, and the summary command runs."""
import os

import pytest
import yaml

from megatron_style.config import MODEL_PRESETS, model_config
from megatron_style.model import summary
from megatron_style.cli import summary as summary_cli

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "model")
REGENERATE = "regenerate with: beit3-summary --dump-presets configs/model"


def test_preset_files_match_the_presets():
    files = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    assert files == sorted(MODEL_PRESETS), REGENERATE
    for name in MODEL_PRESETS:
        with open(os.path.join(CONFIG_DIR, f"{name}.yaml")) as f:
            text = f.read()
        assert yaml.safe_load(text) == MODEL_PRESETS[name], f"{name}.yaml: {REGENERATE}"
        assert text == summary.render_preset(name), f"{name}.yaml: {REGENERATE}"
        model_config(**yaml.safe_load(text))  # a preset file is a valid model section


def test_dump_presets_writes_one_file_per_preset(tmp_path):
    paths = summary.dump_presets(str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == sorted(f"{n}.yaml" for n in MODEL_PRESETS)


def test_summary_command(capsys):
    assert summary_cli.main(["--preset", "tiny", "--text-len", "12", "layers=3"]) == 0
    out = capsys.readouterr().out
    for group, _ in summary.GROUPS:
        assert group in out
    assert "3 layers" in out and "text (12 tokens)" in out and "TFLOP" in out
    assert "ITC (image, text apart)" in out and "ITM (pair + 2 negatives)" in out


def test_the_itc_and_itm_flops_are_the_trainers():
    """The per-pair numbers are what the trainer counts for MFU: ITC's views through
    batch_flops, ITM's fusion batch through itm_flops_function."""
    import re

    import torch

    from megatron_style.batch.pack import pack_samples
    from megatron_style.batch.synthetic import random_sample
    from megatron_style.batch.views import dual_encoder_views
    from megatron_style.config import model_config
    from megatron_style.model.flops import batch_flops, build_on_meta
    from megatron_style.train.step_stats import itm_flops_function

    vlmo = {"attention": "shared", "vl_layers": 2}   # VLMo-Base's layout: ITM runs
    cfg = model_config("base", **vlmo)
    text = summary.summary_text("base", vlmo, 40)
    itc, itm = (float(re.search(rf"{k} \(.*?\)\s+([0-9.]+) TFLOP", text).group(1))
                for k in ("ITC", "ITM"))
    pair = random_sample(cfg, "pair", 40, torch.Generator().manual_seed(0))
    views = dual_encoder_views(pack_samples([pair], cfg), cfg)
    model = build_on_meta(cfg)
    want = (batch_flops(model, views.images) + batch_flops(model, views.texts)) / 1e12
    assert itc == pytest.approx(want, abs=1e-3)   # printed to 1e9 FLOPs
    assert itm == pytest.approx(itm_flops_function(model)([40]) / 1e12, abs=1e-3)
    assert itc > 0 and itm > itc
    assert "needs VL experts" in summary.summary_text("base", {"vl_layers": 0}, 40)


@pytest.mark.parametrize("args, message", [
    (["--preset", "tiny", "layers=0"], "model.layers: must be >= 1"),
    (["--preset", "tiny", "colour=3"], "colour: unknown key"),
    (["--preset", "tiny", "--text-len", "100"], "text_len 100 must be in"),
])
def test_summary_command_errors(capsys, args, message):
    assert summary_cli.main(args) == 2
    assert message in capsys.readouterr().err
