"""A NaN injected into the loss skips that step on every rank: every tensor of the checkpoint
(weights, fp32 masters, Adam moments, step counters) is exactly as before it, and the next
step is a normal one (every tensor moves). N in a row stop the run with exit 3 and a
checkpoint of the last good state."""
import pytest
import torch

from tests.train.launch import TINY, explain, metrics, pretrain, run_dirs

pytestmark = pytest.mark.multiproc


def every_tensor(tag_dir) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint's DeepSpeed files by path (the per-rank RNG and loader
    files are left out: they move with every step, skipped or not)."""
    out: dict[str, torch.Tensor] = {}

    def walk(obj, where):
        if isinstance(obj, torch.Tensor):
            out[where] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{where}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{where}/{i}")

    for f in sorted(tag_dir.glob("*.pt")):
        if not f.name.startswith("rank_state_"):
            walk(torch.load(f, map_location="cpu", weights_only=False), f.name)
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_nan_skips_the_step_exactly_and_training_goes_on(tmp_path, stage):
    p = pretrain([*TINY, *run_dirs(tmp_path), "steps=4", "checkpoint.every_steps=1",
                  "checkpoint.keep_last=10", f"parallel.zero_stage={stage}"], ranks=2,
                 env={"BEIT3_INJECT_NAN_STEPS": "3"})
    assert p.returncode == 0, explain(p)
    assert "step 3: non-finite loss" in p.stdout
    rows = metrics(tmp_path)
    assert [r["guards/skipped_steps"] for r in rows] == [0, 0, 1, 1]
    ck = tmp_path / "run" / "ckpt"
    t2, t3, t4 = (every_tensor(ck / f"step_0000000{i}") for i in (2, 3, 4))
    assert t2.keys() == t3.keys() == t4.keys() and len(t2) > 20
    changed = [k for k in t2 if not torch.equal(t2[k], t3[k])]
    assert not changed, f"the skipped step changed {len(changed)} tensors, e.g. {changed[:5]}"
    # Step 4 is a normal step: every weight, master, moment and counter moves.
    frozen = [k for k in t3 if torch.equal(t3[k], t4[k])]
    assert not frozen, f"step 4 left {len(frozen)} tensors unchanged, e.g. {frozen[:5]}"
    assert all(torch.isfinite(v.float()).all() for v in t4.values())


def test_too_many_nonfinite_stops_with_last_good_state(tmp_path):
    p = pretrain([*TINY, *run_dirs(tmp_path), "steps=8", "checkpoint.every_steps=1",
                  "checkpoint.keep_last=10", "guards.max_nonfinite_in_a_row=3"], ranks=1,
                 env={"BEIT3_INJECT_NAN_STEPS": "3,4,5"})
    assert p.returncode == 3, explain(p)
    assert "3 non-finite losses in a row" in p.stdout
    ck = tmp_path / "run" / "ckpt"
    assert (ck / "step_00000005" / "COMPLETE").is_file()
    t2, t5 = every_tensor(ck / "step_00000002"), every_tensor(ck / "step_00000005")
    assert all(torch.equal(t2[k], t5[k]) for k in t2)
    assert not (ck / "step_00000006").exists()
