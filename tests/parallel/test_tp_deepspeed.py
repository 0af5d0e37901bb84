"""Tensor x data parallel groups with DeepSpeed, on 4 gloo processes (TP=2 x DP=2, one spawn):
the group layout, DeepSpeed's view of it through our `mpu`, random streams per rank, and the
memory planner's parameter and optimizer bytes against a real DeepSpeed engine (ZeRO-1/2/3,
bf16) after one step."""
from __future__ import annotations

import pytest
import torch

from megatron_style.config import model_config
from megatron_style.model.memory_plan import MicroBatch, plan
from megatron_style.parallel.state import group_ranks
from tp_launch import run_workers

pytestmark = pytest.mark.multiproc

STAGES = (1, 2, 3)


def _cfg():
    return model_config("tiny", text_vocab_size=999, visual_vocab_size=255, kernels="reference")


def _tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _optimizer_state_bytes(opt) -> int:
    return _tensor_bytes(v for st in opt.state.values() for k, v in st.items()
                         if torch.is_tensor(v) and k != "step")


def _measure(engine, stage):
    zero_opt = engine.optimizer
    if stage == 3:
        params = _tensor_bytes(p.ds_tensor for p in engine.module.parameters())
        master = _tensor_bytes(zero_opt.fp32_partitioned_groups_flat)
    else:
        params = _tensor_bytes(engine.module.parameters())
        master = _tensor_bytes(zero_opt.single_partition_of_fp32_groups)
    return {"params": params, "optimizer": master + _optimizer_state_bytes(zero_opt.optimizer)}


def _worker(rank, world):
    import deepspeed
    from deepspeed.utils import groups

    from megatron_style.model import MaskedDataModel
    from megatron_style.batch.synthetic import random_batch
    from megatron_style.parallel.random import seed_data_parallel_rank
    from megatron_style.parallel.state import build_parallel_state
    from megatron_style.train.zero3 import register_zero3_parameters

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    state = build_parallel_state(2)
    out = {"tensor_ranks": state.tensor_ranks, "data_ranks": state.data_ranks,
           "tensor_rank": state.tensor_rank, "data_rank": state.data_rank}
    seed_data_parallel_rank(7, state.data_rank)
    out["default_draw"] = torch.rand(4)

    cfg = _cfg()
    for stage in STAGES:
        torch.manual_seed(0)
        model = MaskedDataModel(cfg, state.tp)
        if stage == 3:
            register_zero3_parameters(model, model.beit3.layers)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ds_cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "bf16": {"enabled": True}, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg, mpu=state)
        b = random_batch(cfg, 1, 1, 1, seed=10 + state.data_rank)  # same within a TP group
        b.images = b.images.bfloat16()
        loss = engine(b).loss
        engine.backward(loss)
        engine.step()
        out[f"zero{stage}"] = {**_measure(engine, stage), "dp": engine.dp_world_size,
                               "mp": engine.mp_world_size,
                               "ds_dp": groups._get_data_parallel_world_size(),
                               "loss": loss.detach().float()}
        del engine, opt, model
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_workers(_worker, 4)


def test_group_layout_pure():
    assert group_ranks(8, 2) == ([[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7]])
    assert group_ranks(4, 1) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="parallel.tensor = 3 does not divide the world size 4"):
        group_ranks(4, 3)


def test_groups_on_four_ranks(ranks):
    assert [r["tensor_ranks"] for r in ranks] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [r["data_ranks"] for r in ranks] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [(r["tensor_rank"], r["data_rank"]) for r in ranks] == [(0, 0), (1, 0), (0, 1), (1, 1)]


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_sees_data_parallel_two_and_tensor_two(ranks, stage):
    for r in ranks:
        z = r[f"zero{stage}"]
        assert (z["dp"], z["mp"], z["ds_dp"]) == (2, 2, 2)
    # TP partners computed the same loss on the same batch; data ranks saw different batches.
    assert torch.equal(ranks[0][f"zero{stage}"]["loss"], ranks[1][f"zero{stage}"]["loss"])
    assert not torch.equal(ranks[0][f"zero{stage}"]["loss"], ranks[2][f"zero{stage}"]["loss"])


def test_default_rng_same_in_tensor_group_different_across_data_ranks(ranks):
    d = [r["default_draw"] for r in ranks]
    assert torch.equal(d[0], d[1]) and torch.equal(d[2], d[3])
    assert not torch.equal(d[0], d[2])


@pytest.mark.parametrize("stage", STAGES)
def test_planner_matches_deepspeed_parameter_and_optimizer_bytes(ranks, stage):
    cfg = _cfg()
    mb = MicroBatch(1, 1, 1, 12)
    for r in ranks:
        p = plan(cfg, tensor=2, zero=stage, data_parallel=2, mb=mb, precision="bf16",
                 tensor_rank=r["tensor_rank"])
        got = r[f"zero{stage}"]
        assert got["params"] == pytest.approx(p.params, rel=0.01), "parameter bytes"
        assert got["optimizer"] == pytest.approx(p.optimizer, rel=0.01), "optimizer bytes"
