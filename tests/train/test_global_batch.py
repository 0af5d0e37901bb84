"""The global batch is a property of the run, not of the number of GPUs: giant.yaml (tiny
widths, synthetic data, on CPU) trains 6144 samples per step on 1, 2 and 4 ranks, the
accumulation derived for each; a run without data.global_batch_size that stops on 2 ranks
keeps its batch when it resumes on 1 rank (the checkpoint's manifest records it)."""
from __future__ import annotations

import json
import re

import pytest

from tests.train.launch import TINY, explain, metrics, pretrain, run_dirs

pytestmark = pytest.mark.multiproc

# giant.yaml as it is, at widths a CPU steps through 6144 samples in about a second
GIANT_TINY = ["data.source=synthetic", "model.layers=1", "model.dim=16", "model.ffn_dim=32",
              "model.heads=2", "model.vl_layers=1", "model.img_size=28", "model.text_vocab_size=100",
              "model.visual_vocab_size=16", "model.max_text_len=8", "data.synthetic_text_len=4",
              "parallel.precision=fp32", "parallel.activation_checkpointing=false", "steps=1",
              "checkpoint.save=false", "logging.progress=lines", "data.num_workers=0"]


def _batch_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("batch: "))


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_giant_recipe_trains_6144_samples_per_step_on_any_rank_count(tmp_path, ranks):
    p = pretrain([*GIANT_TINY, *run_dirs(tmp_path)], ranks=ranks, config="configs/pretrain/giant.yaml")
    assert p.returncode == 0, explain(p)
    out = p.stdout + p.stderr
    accum = 6144 // (48 * ranks)
    assert _batch_line(out) == (
        "batch: global batch 6144 samples per step (2048 image, 2048 text, 2048 pair) = "
        f"micro-batch 48 (16 image, 16 text, 16 pair) x {accum} accumulation x {ranks} "
        "data-parallel rank(s)"), explain(p)
    # counted, not computed: the samples every rank trained on in the step, all-reduced
    assert re.search(r"^per step: 6144 samples,", out, re.M), explain(p)


def test_resume_on_fewer_ranks_keeps_the_global_batch(tmp_path):
    common = [*TINY, *run_dirs(tmp_path), "steps=4", "parallel.zero_stage=1",
              "checkpoint.every_steps=100", "data.num_workers=1"]
    first = pretrain([*common, "stop_at_step=2"], ranks=2)
    assert first.returncode == 0, explain(first)
    assert "global batch 12 samples per step" in _batch_line(first.stdout + first.stderr)
    manifest = json.loads((tmp_path / "run" / "ckpt" / "step_00000002" / "COMPLETE").read_text())
    assert manifest["global_batch"] == 12
    second = pretrain(common, ranks=1)
    assert second.returncode == 0, explain(second)
    out = second.stdout + second.stderr
    assert _batch_line(out).startswith("batch: global batch 12 samples per step (4 image, 4 text, "
                                       "4 pair) = micro-batch 6 (2 image, 2 text, 2 pair) x 2 "
                                       "accumulation x 1 data-parallel rank(s)"), explain(second)
    assert "keeping the checkpoint's global batch of 12 samples per step" in out
    assert re.search(r"^per step: 12 samples,", out, re.M), explain(second)
    assert [r["step"] for r in metrics(tmp_path) if "loss" in r] == [1, 2, 3, 4]
    manifest = json.loads((tmp_path / "run" / "ckpt" / "step_00000004" / "COMPLETE").read_text())
    assert manifest["global_batch"] == 12 and manifest["world_size"] == 1
