"""A measurement run: `logging.profile_at_step` writes a torch.profiler trace of exactly the
steps asked for, with the trainer's named ranges in it, and the top-operators table;
`checkpoint.save=false` writes no checkpoint. Bad profile settings name the key."""
import glob
import json

import pytest

from megatron_style.config import ConfigError, load_config
from tests.train.launch import TINY, explain, pretrain, run_dirs


def test_trace_of_the_asked_steps_and_no_checkpoint(tmp_path):
    p = pretrain([*TINY, *run_dirs(tmp_path), "steps=6", "parallel.grad_accum=2",
                  "logging.profile_at_step=3", "logging.profile_steps=2", "checkpoint.save=false",
                  "checkpoint.every_steps=2"])
    assert p.returncode == 0, explain(p)
    assert "finished 6 of 6 steps; checkpoint none (checkpoint.save is false)" in p.stdout
    ckpt = tmp_path / "run" / "ckpt"
    assert not ckpt.exists() or not any(ckpt.iterdir())
    assert "profile of steps 3-4 (rank 0)" in p.stdout, explain(p)
    traces = glob.glob(str(tmp_path / "run" / "tb" / "profile" / "rank0.*.pt.trace.json"))
    assert len(traces) == 1
    with open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    names = [e.get("name", "") for e in events if e.get("ph") == "X"]
    # 2 traced steps x 2 micro-batches; the warm-up step (2) is not in the trace
    assert names.count("forward") == 4 and names.count("backward") == 4
    assert names.count("data") == 4
    assert any(n.startswith("aten::") for n in names)
    top = (tmp_path / "run" / "tb" / "profile" / "rank0_top_ops.txt").read_text()
    assert "Self CPU" in top and "aten::" in top


@pytest.mark.parametrize("override, key", [("logging.profile_at_step=-1", "logging.profile_at_step"),
                                           ("logging.profile_steps=0", "logging.profile_steps"),
                                           ("logging.profile_ranks=[-2]", "logging.profile_ranks")])
def test_bad_profile_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])
