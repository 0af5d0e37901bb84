"""Resume is exact: 6 steps straight equal 3 steps, stop, resume, 3 more (fp32, to 1e-6),
which needs the weights, optimizer moments, schedule, RNG and data position all restored. The
demo data goes through the real loader with a worker process, so data order is included."""
import pytest

from tests.train.launch import TINY, explain, metrics, pretrain, run_dirs

pytestmark = pytest.mark.multiproc

COMMON = [*TINY, "data.source=demo", "data.num_workers=1", "data.masking.image_min_block=2",
          "steps=6", "parallel.zero_stage=1", "model.drop_path=0.1", "checkpoint.every_steps=100"]


def test_six_straight_equals_three_plus_three(tmp_path):
    straight = pretrain([*COMMON, *run_dirs(tmp_path, "a")], ranks=2)
    assert straight.returncode == 0, explain(straight)
    first = pretrain([*COMMON, *run_dirs(tmp_path, "b"), "stop_at_step=3"], ranks=2)
    assert first.returncode == 0, explain(first)
    assert (tmp_path / "b" / "ckpt" / "step_00000003" / "COMPLETE").is_file()
    second = pretrain([*COMMON, *run_dirs(tmp_path, "b")], ranks=2)
    assert second.returncode == 0, explain(second)
    assert "resumed from" in second.stdout and "at step 3" in second.stdout
    a = [r["loss"] for r in metrics(tmp_path, "a")]
    b = [r["loss"] for r in metrics(tmp_path, "b")]
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, abs=1e-6, rel=0)
    # the losses move, so equality is not trivially true
    assert len({round(x, 6) for x in a}) > 1
