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


@pytest.mark.parametrize("args, message", [
    (["--preset", "tiny", "layers=0"], "model.layers: must be >= 1"),
    (["--preset", "tiny", "colour=3"], "colour: unknown key"),
    (["--preset", "tiny", "--text-len", "100"], "text_len 100 must be in"),
])
def test_summary_command_errors(capsys, args, message):
    assert summary_cli.main(args) == 2
    assert message in capsys.readouterr().err
