"""Stagewise runs through the real trainer (VLMo's stages): a run resumed at a stage boundary,
and one resumed inside a stage, continue exactly as the uninterrupted one (the new stage's loader, frozen units, schedule and
objectives), and a stage's frozen units come out of it bit-identical while the rest train,
with ITC and ITM computed under ZeRO-3 on two ranks. The freezing mechanism itself, at every
ZeRO stage and against the optimizer state, is tests/train/test_stages.py's."""
import pytest

from megatron_style.checkpoint.fp32 import consolidated_state_dict
from megatron_style.train.stages import parameter_unit
from tests.train.launch import TINY, explain, metrics, pretrain, run_dirs

pytestmark = pytest.mark.multiproc

# Stage 1: images and texts, MDM, attention frozen with the language side; stage 2: pairs
# joined, MDM + ITC + ITM, everything trained, its own schedule.
STAGES = ("stages=[{name: first, steps: 3, streams: {pair: 0}, train: [attention, vision_ffn, "
          "vision_embed, vision_head]}, {name: second, steps: 3, objective: {mdm: 1, itc: 1, "
          "itm: 1}, train: [all], lr: 5.0e-4, warmup_steps: 1}]")
BOUNDARY = [*TINY, "data.source=demo", "data.num_workers=1", "data.masking.image_min_block=2",
            "data.micro_batch_size=8", "steps=6", "parallel.zero_stage=1", "model.drop_path=0.1",
            "checkpoint.every_steps=100", STAGES]


def test_three_plus_three_across_a_stage_boundary_equal_six_straight(tmp_path):
    """Stopped at the boundary (step 3), then inside the second stage (step 5): both resumes
    continue the uninterrupted run exactly."""
    straight = pretrain([*BOUNDARY, *run_dirs(tmp_path, "a")], ranks=2)
    assert straight.returncode == 0, explain(straight)
    assert "after step 3: stage 2/2 'second'" in straight.stdout
    first = pretrain([*BOUNDARY, *run_dirs(tmp_path, "b"), "stop_at_step=3"], ranks=2)
    assert first.returncode == 0, explain(first)
    second = pretrain([*BOUNDARY, *run_dirs(tmp_path, "b"), "stop_at_step=5"], ranks=2)
    assert second.returncode == 0, explain(second)
    assert "at step 3" in second.stdout
    third = pretrain([*BOUNDARY, *run_dirs(tmp_path, "b")], ranks=2)
    assert third.returncode == 0, explain(third)
    assert "at step 5" in third.stdout
    a, b = metrics(tmp_path, "a"), metrics(tmp_path, "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "loss/itc", "loss/itm"):
        got = [r.get(key) for r in b]
        want = [r.get(key) for r in a]
        assert [x is None for x in got] == [x is None for x in want], key
        assert [x for x in got if x is not None] == pytest.approx(
            [x for x in want if x is not None], abs=1e-6, rel=0), key
    # the second stage is what ran after the boundary: pairs, ITC and ITM, its own lr
    assert all("loss/itc" not in r and "loss/pair_text" not in r for r in a[:3])
    assert all("loss/itc" in r and "loss/itm" in r and "loss/pair_text" in r for r in a[3:])
    assert a[3]["lr"] == pytest.approx(5.0e-4)


FROZEN = ("stages=[{steps: 2}, {steps: 3, objective: {mdm: 1, itc: 1, itm: 1}, "
          "train: [language_ffn, vl_ffn, text_embed, language_head, itc, itm]}]")


def test_frozen_units_are_bit_identical_across_their_stage_under_zero3(tmp_path):
    args = [*TINY, *run_dirs(tmp_path), "steps=5", "parallel.zero_stage=3",
            "checkpoint.every_steps=1", "checkpoint.keep_last=10", "data.micro_batch_size=9",
            "optim.weight_decay=0.1", FROZEN]
    p = pretrain(args, ranks=2)
    assert p.returncode == 0, explain(p)
    before, _ = consolidated_state_dict(str(tmp_path / "run" / "ckpt" / "step_00000002"))
    after, _ = consolidated_state_dict(str(tmp_path / "run" / "ckpt" / "step_00000005"))
    trained = {"language_ffn", "vl_ffn", "text_embed", "language_head", "itc", "itm"}
    frozen_names = [k for k in before if parameter_unit(k) not in trained]
    assert len(frozen_names) > 20 and any(".attn." in k for k in frozen_names)
    for k in frozen_names:   # weight decay 0.1 would move any of them, Adam any with a gradient
        assert before[k].equal(after[k]), k
    moved = [k for k in before if parameter_unit(k) in trained and not before[k].equal(after[k])]
    assert {parameter_unit(k) for k in moved} == trained
    rows = metrics(tmp_path)
    assert all(r["loss/itm"] > 0 and 0 <= r["acc/itc_i2t"] <= 1 for r in rows[2:])


def test_a_stage_run_resumes_on_another_number_of_ranks(tmp_path):
    """Units frozen since step 0 have never been stepped; their optimizer state must still be
    there (zeros) for DeepSpeed's universal checkpoint, which an elastic resume goes through."""
    args = [*TINY, *run_dirs(tmp_path), "steps=4", "parallel.zero_stage=1",
            "checkpoint.every_steps=100", "data.micro_batch_size=9",
            "stages=[{steps: 2, train: [attention, vision_ffn, vision_embed, vision_head]}, "
            "{steps: 2, objective: {mdm: 1, itc: 1}}]"]
    first = pretrain([*args, "stop_at_step=2"], ranks=2)
    assert first.returncode == 0, explain(first)
    second = pretrain(args, ranks=1)
    assert second.returncode == 0, explain(second)
    assert "at step 2" in second.stdout
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] and "loss/itc" in r for r in rows[2:])
