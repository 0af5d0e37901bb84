"""Tensor parallelism through the real trainer (`deepspeed --num_gpus N -m ...pretrain`, CPU,
gloo, fp32): TP=2 x DP=2 on 4 ranks under ZeRO-1 and ZeRO-2 gives the same per-step loss,
global gradient norm and final weights as TP=1 x DP=2 for 3 steps with drop path on; and the
TP=1 run's checkpoint (2 data-parallel ranks) resumes on 1 rank and trains on."""
from __future__ import annotations

import pytest
import torch

from megatron_style.checkpoint.fp32 import consolidated_state_dict
from tests.train.launch import TINY, explain, metrics, pretrain, run_dirs

pytestmark = pytest.mark.multiproc

COMMON = [*TINY, "steps=3", "model.drop_path=0.1", "model.text_vocab_size=998",
          "checkpoint.every_steps=100"]
TOL = dict(rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp1")
    p = pretrain([*COMMON, *run_dirs(root), "parallel.zero_stage=1"], ranks=2)
    assert p.returncode == 0, explain(p)
    return root


def _final_weights(root):
    sd, meta = consolidated_state_dict(str(root / "run" / "ckpt" / "step_00000003"))
    assert meta["step"] == 3
    return sd


@pytest.mark.parametrize("stage", [1, 2])
def test_tp2_dp2_matches_tp1_through_the_trainer(tmp_path, tp1, stage):
    p = pretrain([*COMMON, *run_dirs(tmp_path), f"parallel.zero_stage={stage}",
                  "parallel.tensor=2"], ranks=4)
    assert p.returncode == 0, explain(p)
    assert "2 data-parallel x 2 tensor-parallel" in p.stdout
    want, got = metrics(tp1), metrics(tmp_path)
    assert [r["step"] for r in got] == [1, 2, 3]
    # The loss is replicated over tensor ranks; the gradient norm is DeepSpeed's global one,
    # which counts replicated parameters once per TP group (our mpu and parameter tags).
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], **TOL)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], **TOL)
    assert len({round(r["loss"], 5) for r in want}) > 1
    # Weights after 3 AdamW steps: Adam's g / sqrt(v) turns fp32 summation-order noise in
    # tiny gradients into differences of a small fraction of lr (1e-3) per step.
    a, b = _final_weights(tp1), _final_weights(tmp_path)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # beit3-export writes the TP-merged fp32 weights (streamed) with the run's step and config
    from megatron_style.cli.export import main as export_main
    out = tmp_path / "exported.pt"
    assert export_main([str(tmp_path / "run" / "ckpt"), "--out", str(out)]) == 0
    ex = torch.load(out, weights_only=False)
    assert ex["step"] == 3 and "tensor: 2" in ex["config"]
    assert all(torch.equal(ex["model"][k], b[k]) for k in b)
    # beit3-convert-tp reads the checkpoint directory (config included) and re-splits it
    from megatron_style.cli.convert_tp import main as convert_main
    tp4 = tmp_path / "tp4"
    assert convert_main([str(tmp_path / "run" / "ckpt" / "step_00000003"), "--tensor", "4",
                         "--out", str(tp4)]) == 0
    shards = [torch.load(tp4 / f"tp_rank_0{r}.pt", weights_only=True) for r in range(4)]
    assert [s_["text_head.weight"].shape[0] for s_ in shards] == [250, 250, 250, 248]


def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path, tp1):
    import shutil
    shutil.copytree(tp1 / "run" / "ckpt", tmp_path / "run" / "ckpt")
    p = pretrain([*COMMON, *run_dirs(tmp_path), "parallel.zero_stage=1", "steps=5"], ranks=1)
    assert p.returncode == 0, explain(p)
    assert "resumed from" in p.stdout and "at step 3" in p.stdout
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [4, 5]
    assert all(r["loss"] == r["loss"] for r in rows)   # finite, not NaN


def test_itc_and_itm_under_tp2_dp2_match_tp1(tmp_path):
    """The contrastive negatives are gathered over the data-parallel group, not the world:
    over the world each pair would come back once per tensor rank, as its own false negative,
    and the ITC loss, ITM's negatives and every gradient would differ from TP=1. The ITC/ITM
    heads are replicated like any untagged parameter, and merge back as they are. ITC is
    pooled over the step's 2 micro-batches (objective.itc_batch: step), whose pass 1 gathers
    over the same group and whose drop-path seeds must agree within a tensor group."""
    itc = [*COMMON, "data.micro_batch_size=8", "objective.itc=1", "objective.itm=1",
           "objective.itc_batch=step", "parallel.grad_accum=2", "parallel.zero_stage=1"]
    ref = pretrain([*itc, *run_dirs(tmp_path, "tp1")], ranks=2)
    assert ref.returncode == 0, explain(ref)
    p = pretrain([*itc, *run_dirs(tmp_path, "tp2"), "parallel.tensor=2"], ranks=4)
    assert p.returncode == 0, explain(p)
    want, got = metrics(tmp_path, "tp1"), metrics(tmp_path, "tp2")
    for key in ("loss", "loss/itc", "acc/itc_i2t", "loss/itm", "grad_norm"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], **TOL), key
    a = consolidated_state_dict(str(tmp_path / "tp1" / "ckpt" / "step_00000003"))[0]
    b = consolidated_state_dict(str(tmp_path / "tp2" / "ckpt" / "step_00000003"))[0]
    assert set(a) == set(b) and {"itc.logit_scale", "itm.head.weight"} <= set(a)
    # Adam's g / sqrt(v) on an embedding row with a near-zero gradient turns summation-order
    # noise into up to ~1e-4 here (a tenth of lr); a wrong gradient moves weights by ~lr a step.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=3e-4, msg=lambda m, k=k: f"{k}: {m}")
    assert max(float((b[k] - a[k]).abs().median()) for k in a) < 1e-6
