"""Elastic resume and consolidated export of DeepSpeed checkpoints (ZeRO-1, -2, -3, fp32):
saved by 2 data-parallel ranks, loaded by 1 and by 4, every parameter's fp32 master weight
and both Adam moments must come back exactly (gathered with DeepSpeed's safe_get_full_*);
the consolidated export equals the saved weights and holds one tensor at a time."""
from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

from megatron_style.config import PretrainConfig, dump_yaml, model_config
from megatron_style.checkpoint.fp32 import export_fp32, fp32_parameters, write_streaming
from tp_launch import run_workers

pytestmark = pytest.mark.multiproc

STAGES = (1, 2, 3)
TAG = "t"


def _cfg():
    return model_config("tiny", text_vocab_size=999, kernels="reference")


def _engine(stage, seed):
    import deepspeed

    from megatron_style.model import MaskedDataModel
    from megatron_style.train.zero3 import register_zero3_parameters

    torch.manual_seed(seed)
    model = MaskedDataModel(_cfg())
    if stage == 3:
        register_zero3_parameters(model, model.beit3.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return engine


def _step(engine, seed):
    import torch.distributed as dist

    from megatron_style.batch.synthetic import random_batch
    b = random_batch(_cfg(), 1, 1, 1, seed=seed + 10 * dist.get_rank())
    loss = engine(b).loss
    engine.backward(loss)
    engine.step()
    return loss.detach()


def _full_state(engine):
    """Every parameter's fp32 master and Adam moments, whole (collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    out = {}
    for name, p in engine.module.named_parameters():
        out[name] = tuple(t.clone() for t in (safe_get_full_fp32_param(p),
                                              safe_get_full_optimizer_state(p, "exp_avg"),
                                              safe_get_full_optimizer_state(p, "exp_avg_sq")))
    return out


def _save_worker(rank, world, root):
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    out = {}
    client = {"step": 2, "config": dump_yaml(PretrainConfig(model=_cfg()))}
    for stage in STAGES:
        engine = _engine(stage, seed=0)
        for i in range(2):
            _step(engine, seed=i)
        engine.save_checkpoint(os.path.join(root, f"z{stage}"), tag=TAG, client_state=client)
        out[stage] = _full_state(engine)
    return out if rank == 0 else None


def _load_worker(rank, world, root):
    import deepspeed

    from megatron_style.checkpoint.universal import load_resharded, needs_resharding
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    out = {}
    for stage in STAGES:
        engine = _engine(stage, seed=1)           # other initial weights: the load must matter
        load_dir = os.path.join(root, f"z{stage}")
        assert needs_resharding(engine, load_dir, TAG)
        client = load_resharded(engine, load_dir, TAG)
        state = _full_state(engine)
        loss = _step(engine, seed=5)              # and it trains on
        out[stage] = {"state": state, "client_step": client["step"], "loss": loss}
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("elastic"))
    saved = run_workers(_save_worker, 2, root)[0]
    # The streaming export runs on the files as written by 2 ranks (before any conversion).
    exports = {}
    for stage in STAGES:
        path = os.path.join(root, f"export_z{stage}.pt")
        export_fp32(os.path.join(root, f"z{stage}", TAG), path, extra={"step": 2})
        exports[stage] = torch.load(path, weights_only=True)
    loaded = {n: run_workers(_load_worker, n, root)[0] for n in (1, 4)}
    return {"root": root, "saved": saved, "loaded": loaded, "exports": exports}


@pytest.mark.parametrize("world", [1, 4])
@pytest.mark.parametrize("stage", STAGES)
def test_resume_on_other_data_parallel_size_restores_weights_and_moments(runs, stage, world):
    want = runs["saved"][stage]
    got = runs["loaded"][world][stage]
    assert got["client_step"] == 2
    assert set(got["state"]) == set(want)
    for name, (w, m, v) in want.items():
        gw, gm, gv = got["state"][name]
        assert torch.equal(gw, w), f"fp32 weight of {name}"
        assert torch.equal(gm, m), f"exp_avg of {name}"
        assert torch.equal(gv, v), f"exp_avg_sq of {name}"
    assert torch.isfinite(got["loss"])
    assert float(want["text_head.weight"][2].abs().max()) > 0   # moments are not empty


@pytest.mark.parametrize("stage", STAGES)
def test_consolidated_export_equals_the_saved_fp32_weights(runs, stage):
    ex = runs["exports"][stage]
    assert ex["step"] == 2
    want = {k: v[0] for k, v in runs["saved"][stage].items()}
    assert set(ex["model"]) == set(want)
    for k, v in want.items():
        assert torch.equal(ex["model"][k], v), k


def test_export_holds_one_tensor_at_a_time(runs, tmp_path):
    """Each tensor the reader yields is gone before the next one is built."""
    shapes, tensors = fp32_parameters(os.path.join(runs["root"], "z3", TAG))
    alive: list[weakref.ref] = []
    overlaps = []

    def watched():
        for name, t in tensors:
            gc.collect()
            overlaps.extend(r for r in alive if r() is not None)
            alive.append(weakref.ref(t))
            yield name, t
            del t

    write_streaming(str(tmp_path / "w.pt"), shapes, watched())
    assert len(alive) == len(shapes) and not overlaps
