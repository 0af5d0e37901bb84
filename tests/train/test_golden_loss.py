"""Golden losses: the first steps of the tiny recipe on fixed seeds must match the file kept in
tests/golden/. Any change to the model, initialisation, packing, optimiser or schedule that
moves them shows up here. When a change is meant to move them, regenerate deliberately:

    BEIT3_REGENERATE_GOLDEN=1 pytest tests/train/test_golden_loss.py

and say why in the commit message."""
import json
import os
import pathlib

import pytest

from tests.train.launch import TINY, explain, metrics, pretrain, run_dirs

GOLDEN = pathlib.Path(__file__).parent.parent / "golden" / "tiny_synthetic_losses.json"
ARGS = [*TINY, "steps=5", "parallel.zero_stage=0", "seed=1234", "model.drop_path=0.1",
        "checkpoint.every_steps=100"]


def test_first_steps_match_golden_losses(tmp_path):
    p = pretrain([*ARGS, *run_dirs(tmp_path)], env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, explain(p)
    rows = metrics(tmp_path)
    # loss/pair_image only where pair images are masked (data.masking.pair_image_ratio > 0)
    got = {"loss": [r["loss"] for r in rows],
           "streams": {k: [r[k] for r in rows] for k in ("loss/image", "loss/text", "loss/pair_image",
                                                         "loss/pair_text") if k in rows[0]}}
    if os.environ.get("BEIT3_REGENERATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"args": ARGS, **got}, indent=2) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    assert want["args"] == ARGS, "the recipe changed: regenerate the golden file deliberately"
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert sorted(got["streams"]) == sorted(want["streams"])
    for k, v in want["streams"].items():
        assert got["streams"][k] == pytest.approx(v, rel=1e-5), k
