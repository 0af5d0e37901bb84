"""ITC pooled over the step (objective.itc_batch: step) through the real trainer, 2 ranks x 2
micro-batches, drop path on: ZeRO-3 (whose parameter gathering pass 1 must go through)
gives ZeRO-1's losses and gradient norms, and a run stopped after step 2 and resumed goes on
exactly (each micro-batch's ITC seed comes from the step). That the pooled gradient is the
one of a single contrastive batch of the step is tests/parallel/test_itc_step_pool.py's; the
same under TP=2 x DP=2 is tests/parallel/test_tp_trainer.py's."""
import pytest

from tests.train.launch import TINY, explain, metrics, pretrain, run_dirs

pytestmark = pytest.mark.multiproc

POOLED = [*TINY, "steps=4", "parallel.grad_accum=2", "model.drop_path=0.1",
          "objective={mdm: 1, itc: 1, itm: 1, itc_batch: step}", "checkpoint.every_steps=100"]
KEYS = ("loss", "loss/itc", "acc/itc_i2t", "loss/itm", "acc/itm", "grad_norm")


def test_pooled_itc_at_zero3_resumed_equals_zero1_straight(tmp_path):
    straight = pretrain([*POOLED, *run_dirs(tmp_path, "z1"), "parallel.zero_stage=1"], ranks=2)
    assert straight.returncode == 0, explain(straight)
    assert ("ITC: 8 pairs per contrastive batch, every pair of the step (2 x 2 micro-batches "
            "x 2 data-parallel rank(s); objective.itc_batch=step)") in straight.stdout
    z3 = [*POOLED, *run_dirs(tmp_path, "z3"), "parallel.zero_stage=3"]
    first = pretrain([*z3, "stop_at_step=2"], ranks=2)
    assert first.returncode == 0, explain(first)
    second = pretrain(z3, ranks=2)
    assert second.returncode == 0, explain(second)
    assert "at step 2" in second.stdout
    want, got = metrics(tmp_path, "z1"), metrics(tmp_path, "z3")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for key in KEYS:
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-5,
                                                       abs=1e-6), key
