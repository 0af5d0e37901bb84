"""The giant and base recipes are the paper's (BEiT-3 Table 11 and section 2), read back with
--print-config as a user sees them; a global batch that cannot be split over the ranks of a
launch stops it before any process group starts, naming the numbers."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from megatron_style.config import load_config
from tests.train.launch import ROOT, explain


def print_config(recipe: str, *overrides: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "megatron_style.train.pretrain", "--config", recipe,
                        "--print-config", *overrides], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, explain(p)
    return yaml.safe_load(p.stdout)


# Table 11 (pretraining hyperparameters of BEiT-3 giant) and section 2.2 / 2.3.
TABLE_11 = {
    ("model", "layers"): 40, ("model", "dim"): 1408, ("model", "ffn_dim"): 6144,
    ("model", "heads"): 16, ("model", "patch_size"): 14, ("model", "img_size"): 224,
    ("model", "drop_path"): 0.1, ("model", "init"): "beit", ("model", "init_std"): 0.02,
    ("optim", "lr"): 1e-3, ("optim", "betas"): [0.9, 0.98], ("optim", "eps"): 1e-6,
    ("optim", "weight_decay"): 0.05, ("optim", "warmup_steps"): 10000,
    ("optim", "grad_clip"): 3.0, ("optim", "min_lr_ratio"): 0.0, ("steps",): 1_000_000,
    ("data", "global_batch_size"): 6144, ("data", "color_jitter"): 0.4,
    ("data", "crop_scale"): [0.08, 1.0],
    ("data", "masking", "text_ratio"): 0.15, ("data", "masking", "pair_text_ratio"): 0.5,
    ("data", "masking", "image_ratio"): 0.4, ("data", "masking", "image_min_block"): 16,
    ("data", "tokenizer", "visual"): "vqkd",
}


def _get(d, path):
    for k in path:
        d = d[k]
    return d


@pytest.mark.parametrize("recipe", ["configs/pretrain/giant.yaml", "configs/pretrain/base.yaml"])
def test_recipes_are_the_papers(recipe):
    cfg = print_config(recipe)
    giant = recipe.endswith("giant.yaml")
    for path, want in TABLE_11.items():
        if not giant and path[0] == "model" and path[1] in ("layers", "dim", "ffn_dim", "heads",
                                                             "patch_size"):
            continue  # base is the released 12-layer model, patch 16
        got = _get(cfg, path)
        assert got == pytest.approx(want), (recipe, path, got, want)
    # the batch: 6144 = 2048 images + 2048 texts + 2048 pairs, accumulation derived per run
    d = cfg["data"]
    assert [d[s]["weight"] for s in ("image", "text", "pair")] == [1.0, 1.0, 1.0]
    assert cfg["parallel"]["grad_accum"] == 1
    counts = load_config(recipe).data.stream_counts()
    micro = d["micro_batch_size"]
    assert all(n * 6144 // micro == 2048 for n in counts.values()), counts
    # BEiT's flip on images; pairs keep their "left of" (our documented exception)
    assert d["image"]["flip"] in (None, True) and d["pair"]["flip"] in (None, False)
    assert load_config(recipe).data.flips("image") and not load_config(recipe).data.flips("pair")


def _launch_as_rank0_of(world: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    return subprocess.run([sys.executable, "-m", "megatron_style.train.pretrain", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_global_batch_that_does_not_divide_stops_before_start_up(tmp_path):
    """giant.yaml on 3 ranks: 6144 / (48 x 3) is not whole. Exit 2 before any process group
    starts (a rank waiting on the others would hang here: MASTER_PORT 1 answers nobody)."""
    p = _launch_as_rank0_of(3, "--config", "configs/pretrain/giant.yaml", "data.source=synthetic",
                            f"checkpoint.dir={tmp_path}/ck")
    assert p.returncode == 2, explain(p)
    assert "ConfigError: data.global_batch_size: 6144 samples per step cannot be split over 3 " \
           "data-parallel rank(s) x 48 samples per micro-batch" in p.stderr, explain(p)
    assert "1, 2, 4, 8, 16, 32, 64, 128" in p.stderr


def test_global_batch_and_grad_accum_are_not_both_given():
    p = _launch_as_rank0_of(1, "--config", "configs/pretrain/giant.yaml", "parallel.grad_accum=4",
                            "--print-config")
    assert p.returncode == 2 and "ConfigError: parallel.grad_accum: is derived from " \
        "data.global_batch_size=6144" in p.stderr, explain(p)
    p = _launch_as_rank0_of(1, "--config", "configs/pretrain/giant.yaml",
                            "data.global_batch_size=100", "--print-config")
    assert p.returncode == 2 and "not a multiple of data.micro_batch_size=48" in p.stderr, explain(p)
