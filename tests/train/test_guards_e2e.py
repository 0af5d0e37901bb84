"""A NaN injected into the loss skips that step on every rank (weights unchanged) and is
counted; N in a row stop the run with exit 3 and a checkpoint of the last good state."""
import pytest
import torch

from megatron_style.train.export import consolidated_state_dict
from tests.train.launch import TINY, explain, metrics, pretrain, run_dirs

pytestmark = pytest.mark.multiproc


def weights(path):
    return consolidated_state_dict(str(path))[0]


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nan_skips_the_step_and_training_goes_on(tmp_path):
    p = pretrain([*TINY, *run_dirs(tmp_path), "steps=4", "checkpoint.every_steps=1",
                  "checkpoint.keep_last=10"], ranks=2, env={"BEIT3_INJECT_NAN_STEPS": "3"})
    assert p.returncode == 0, explain(p)
    assert "step 3: non-finite loss" in p.stdout
    rows = metrics(tmp_path)
    assert [r["guards/skipped_steps"] for r in rows] == [0, 0, 1, 1]
    ck = tmp_path / "run" / "ckpt"
    w2, w3, w4 = (weights(ck / f"step_0000000{i}") for i in (2, 3, 4))
    assert same(w2, w3), "the skipped step changed the weights"
    assert not same(w3, w4), "training did not go on after the skipped step"


def test_too_many_nonfinite_stops_with_last_good_state(tmp_path):
    p = pretrain([*TINY, *run_dirs(tmp_path), "steps=8", "checkpoint.every_steps=1",
                  "checkpoint.keep_last=10", "guards.max_nonfinite_in_a_row=3"], ranks=1,
                 env={"BEIT3_INJECT_NAN_STEPS": "3,4,5"})
    assert p.returncode == 3, explain(p)
    assert "3 non-finite losses in a row" in p.stdout
    ck = tmp_path / "run" / "ckpt"
    assert (ck / "step_00000005" / "COMPLETE").is_file()
    assert same(weights(ck / "step_00000002"), weights(ck / "step_00000005"))
    assert not (ck / "step_00000006").exists()
