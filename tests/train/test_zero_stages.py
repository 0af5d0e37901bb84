"""The tiny model trains for 3 steps under `deepspeed --num_gpus 2` (CPU, gloo) at every ZeRO
stage, and leaves a complete checkpoint and TensorBoard logs."""
import math

import pytest

from tests.train.launch import TINY, explain, metrics, pretrain, run_dirs

pytestmark = pytest.mark.multiproc


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_three_steps_on_two_ranks(tmp_path, stage):
    p = pretrain([*TINY, *run_dirs(tmp_path), "steps=3", f"parallel.zero_stage={stage}"], ranks=2)
    assert p.returncode == 0, explain(p)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert "2 rank(s)" in p.stdout
    assert (tmp_path / "run" / "ckpt" / "step_00000003" / "COMPLETE").is_file()
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_bf16_with_activation_checkpointing_and_a_missing_stream(tmp_path):
    """The giant recipe's settings (bf16, per-block recomputation) on CPU, with no pairs in the
    batches so the VL expert gets no tokens and must still get a (zero) gradient under ZeRO-2."""
    p = pretrain([*TINY, *run_dirs(tmp_path), "steps=3", "parallel.zero_stage=2",
                  "parallel.precision=bf16", "parallel.activation_checkpointing=true",
                  "data.pair.weight=0"], ranks=2)
    assert p.returncode == 0, explain(p)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert "loss/pair_text" not in rows[-1] and "loss/text" in rows[-1]
