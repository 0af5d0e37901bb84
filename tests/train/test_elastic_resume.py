"""A run stopped on 2 ranks resumes on 1 rank with another number of loader workers: the model
and optimizer come back through DeepSpeed's universal checkpoint, the data position is carried
over (data/reshard.py) rather than restarted, and training goes on to the last step."""
import glob

import pytest
import torch

from tests.train.launch import TINY, explain, metrics, pretrain, run_dirs

pytestmark = pytest.mark.multiproc

COMMON = [*TINY, "data.source=demo", "data.masking.image_min_block=2", "steps=4",
          "parallel.zero_stage=1", "checkpoint.every_steps=100"]


def test_two_ranks_stop_one_rank_resumes_with_the_data_position(tmp_path):
    shm_before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    first = pretrain([*COMMON, *run_dirs(tmp_path), "data.num_workers=1", "stop_at_step=2"],
                     ranks=2)
    assert first.returncode == 0, explain(first)
    # DeepSpeed's CPU all-reduce buffers (66 MB a rank) do not outlive the run
    assert set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) == shm_before
    second = pretrain([*COMMON, *run_dirs(tmp_path), "data.num_workers=2"], ranks=1)
    assert second.returncode == 0, explain(second)
    out = second.stdout + second.stderr
    assert "the data position is carried over" in out, explain(second)
    # the demo readers go on after the 2 steps x 2 ranks x 2 samples per stream (indices 0-7)
    assert "image: demo sample 8" in out and "pair: demo sample 8" in out, explain(second)
    steps = [r["step"] for r in metrics(tmp_path) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    state = torch.load(tmp_path / "run" / "ckpt" / "step_00000004" / "rank_state_00000.pt",
                       weights_only=False)["loader"]
    assert state["plan"]["dp_world"] == 1 and state["plan"]["num_workers"] == 2
    assert state["base"]["image"]["gen"] == 1
