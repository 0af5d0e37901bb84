"""The recipe is checked before anything starts: unknown keys and bad values name the key."""
import time

import pytest

from megatron_style.config import ConfigError, load_config, model_config
from tests.train.launch import explain, pretrain


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key"):
        load_config(None, ["optim.learning_rate=0.1"])


@pytest.mark.parametrize("override, key", [
    ("parallel.zero_stage=4", "parallel.zero_stage"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=fast", "optim.lr"),
    ("model.heads=5", "model.heads"),
    ("parallel.precision=fp8", "parallel.precision"),
    ("data.masking.image_ratio=1.5", "data.masking.image_ratio"),
    ("model.preset=huge", "model.preset"),
    ("data.source=shards", "data.image.shards"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_presets_and_overrides():
    cfg = load_config(None, ["model.preset=giant", "model.layers=4", "steps=7"])
    assert (cfg.model.layers, cfg.model.dim, cfg.model.head_dim, cfg.steps) == (4, 1408, 88, 7)
    assert model_config("base").attention == "decoupled"


def test_stream_counts_follow_weights():
    cfg = load_config(None, ["data.micro_batch_size=10", "data.text.weight=3", "data.pair.weight=1",
                             "data.image.weight=1"])
    assert cfg.data.stream_counts() == {"image": 2, "text": 6, "pair": 2}


def test_cli_rejects_bad_config_fast(tmp_path):
    t = time.time()
    p = pretrain(["model.preset=tiny", "parallel.zero_stage=7"])
    assert p.returncode == 2, explain(p)
    assert "ConfigError: parallel.zero_stage" in p.stderr
    assert time.time() - t < 60


def test_cli_rejects_missing_init_file(tmp_path):
    p = pretrain(["model.preset=tiny", f"checkpoint.init_from={tmp_path / 'nope.pt'}"])
    assert p.returncode == 2, explain(p)
    assert "checkpoint.init_from" in p.stderr and "does not exist" in p.stderr


@pytest.mark.parametrize("recipe", ["demo", "base", "giant"])
def test_shipped_recipes_are_valid(recipe):
    cfg = load_config(f"configs/pretrain/{recipe}.yaml")
    assert sum(cfg.data.stream_counts().values()) == cfg.data.micro_batch_size


def test_deepspeed_file_is_merged_but_cannot_contradict_the_recipe():
    from megatron_style.train.engine import deepspeed_config
    f = "configs/deepspeed/zero3_offload.json"
    with pytest.raises(ConfigError, match="parallel.zero_stage: is 1 but the DeepSpeed config says stage 3"):
        load_config(None, [f"parallel.deepspeed_file={f}"])
    ds = deepspeed_config(load_config(None, [f"parallel.deepspeed_file={f}", "parallel.zero_stage=3"]))
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["train_micro_batch_size_per_gpu"] == 1
    with pytest.raises(ConfigError, match="train_batch_size"):
        load_config(None, ["parallel.deepspeed={train_batch_size: 64}"])


def test_cli_rejects_missing_data_path_before_starting(tmp_path):
    p = pretrain(["model.preset=tiny", "data.source=shards", "data.image.weight=0", "data.text.weight=0",
                  f"data.pair.shards={tmp_path}/nothing/{{00000..00009}}.tar"])
    assert p.returncode == 2, explain(p)
    assert "ConfigError: data.pair.shards" in p.stderr
    assert "rank(s)" not in p.stdout  # no process group, no engine was started


def test_synthetic_source_needs_no_data_or_tokenizer_files():
    """The documented giant measurement (giant.yaml + data.source=synthetic) must start on a
    machine without the recipe's data and tokenizer files; with real data they are checked."""
    from megatron_style.train.preflight import preflight
    preflight(load_config("configs/pretrain/giant.yaml", ["data.source=synthetic"]))
    with pytest.raises(ConfigError, match="data.image.shards"):
        preflight(load_config("configs/pretrain/giant.yaml"))
    with pytest.raises(ConfigError, match="data.tokenizer.text_model: '/models/beit3.spm' does not exist"):
        preflight(load_config("configs/pretrain/demo.yaml", ["data.tokenizer.text_model=/models/beit3.spm"]))
