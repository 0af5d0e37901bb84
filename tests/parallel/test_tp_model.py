"""TP=2 against TP=1 for the whole masked-data model, on 2 gloo processes (one spawn):
loss, statistics and merged gradients of a forward/backward over all three streams with a
VL-expert layer and drop path, three AdamW steps, and checkpoint conversion both ways
(TP=2 -> TP=1 gives the same outputs; TP=1 -> TP=2 gives the same outputs and trains on).
Both attention layouts; text and visual vocabularies are odd, so their split is uneven."""
from __future__ import annotations

import pytest
import torch

from megatron_style.config import model_config
from megatron_style.model import MaskedDataModel
from megatron_style.batch.synthetic import random_batch
from megatron_style.checkpoint.tp_split import merge_tp, split_tp
from megatron_style.parallel.mappings import TPGroup
from tp_launch import run_workers

pytestmark = pytest.mark.multiproc

LAYOUTS = {"shared": dict(attention="shared", vl_layers=1),
           "decoupled": dict(attention="decoupled", vl_layers=0)}
STEPS = 3
TOL = dict(rtol=1e-5, atol=1e-5)


def _cfg(layout):
    return model_config("tiny", text_vocab_size=999, visual_vocab_size=255, drop_path=0.1,
                        kernels="reference", **LAYOUTS[layout])


def _batch(cfg):
    return random_batch(cfg, images=2, texts=2, pairs=2, text_lens=(4, 12), seed=3)


def _optimizer(model):
    # lr 1e-3: Adam's update g / (sqrt(v) + eps) turns fp32 summation-order noise in
    # near-zero gradients into parameter differences proportional to lr.
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6,
                             weight_decay=0.05)


def _clone_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _scenario(layout, tp, start_shard=None):
    """Everything one process does for one layout; `tp` None is the single-process run."""
    cfg = _cfg(layout)
    b = _batch(cfg)
    torch.manual_seed(0)                       # same full-weight draws on every rank
    model = MaskedDataModel(cfg, tp).train()
    out = {}
    opt = _optimizer(model)
    losses = []
    for step in range(STEPS):
        torch.manual_seed(100 + step)          # drop-path masks: same stream on every rank
        opt.zero_grad()
        o = model(b)
        o.loss.backward()
        if step == 0:
            out["loss0"], out["stats0"] = o.loss.detach(), o.stats
            out["grads0"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        losses.append(o.loss.detach())
        opt.step()
    out["losses"] = torch.stack(losses)
    out["state"] = _clone_state(model)
    with torch.no_grad():
        out["eval_loss"] = model.eval()(b).loss
    if start_shard is not None:                # continue from a converted checkpoint
        model.load_state_dict(start_shard)
        with torch.no_grad():
            out["start_eval_loss"] = model.eval()(b).loss
        model.train()
        opt = _optimizer(model)
        opt.zero_grad(set_to_none=True)      # drop the gradients of the run above
        torch.manual_seed(300)
        o = model(b)
        o.loss.backward()
        opt.step()
        out["start_step_loss"] = o.loss.detach()
        out["start_state_after"] = _clone_state(model)
    return out


def _worker(rank, world, start_shards):
    import torch.distributed as dist
    tp = TPGroup(dist.group.WORLD, rank, world)
    return {layout: _scenario(layout, tp, start_shards[layout][rank]) for layout in LAYOUTS}


def _perturbed(state, seed):
    """A different model state (the TP=1 -> TP=2 conversion must not start from weights the
    TP=2 processes already hold)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.fixture(scope="module")
def ref():
    """Single-process runs, plus the TP=1 checkpoint that is split for the TP=2 processes."""
    out = {}
    for layout in LAYOUTS:
        r = _scenario(layout, None)
        start = _perturbed(r["state"], seed=7)
        cfg = _cfg(layout)
        r["start_shards"] = split_tp(start, cfg, 2)
        r.update({f"start_{k}": v for k, v in _scenario_from(start, cfg).items()})
        out[layout] = r
    return out


def _scenario_from(state, cfg):
    """TP=1 evaluation and one training step from `state`, as the TP=2 workers do."""
    model = MaskedDataModel(cfg).train()
    model.load_state_dict(state)
    b = _batch(cfg)
    with torch.no_grad():
        eval_loss = model.eval()(b).loss
    model.train()
    opt = _optimizer(model)
    torch.manual_seed(300)
    o = model(b)
    o.loss.backward()
    opt.step()
    return {"eval_loss": eval_loss, "step_loss": o.loss.detach(), "state_after": _clone_state(model)}


@pytest.fixture(scope="module")
def tp2(ref):
    return run_workers(_worker, 2, {layout: ref[layout]["start_shards"] for layout in LAYOUTS})


def _merge(per_rank, layout):
    return merge_tp(per_rank, _cfg(layout))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_and_stats_match_tp1(tp2, ref, layout):
    for rank in range(2):
        torch.testing.assert_close(tp2[rank][layout]["loss0"], ref[layout]["loss0"], **TOL)
        torch.testing.assert_close(tp2[rank][layout]["stats0"], ref[layout]["stats0"], **TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_merged_gradients_match_tp1(tp2, ref, layout):
    # merge_tp also requires every replicated gradient to be bitwise equal on both ranks
    # (drop path and every replicated computation agree across tensor ranks).
    grads = _merge([tp2[r][layout]["grads0"] for r in range(2)], layout)
    want = ref[layout]["grads0"]
    assert set(grads) == set(want)
    for name in want:
        torch.testing.assert_close(grads[name], want[name], **TOL,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_three_optimizer_steps_match_tp1(tp2, ref, layout):
    for rank in range(2):
        torch.testing.assert_close(tp2[rank][layout]["losses"], ref[layout]["losses"], **TOL)
    state = _merge([tp2[r][layout]["state"] for r in range(2)], layout)
    for name, want in ref[layout]["state"].items():
        torch.testing.assert_close(state[name], want, **TOL,
                                   msg=lambda m, name=name: f"{name} after {STEPS} steps: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tp2_checkpoint_merged_to_tp1_gives_same_outputs(tp2, layout):
    cfg = _cfg(layout)
    model = MaskedDataModel(cfg).eval()
    model.load_state_dict(_merge([tp2[r][layout]["state"] for r in range(2)], layout))
    with torch.no_grad():
        loss = model(_batch(cfg)).loss
    torch.testing.assert_close(loss, tp2[0][layout]["eval_loss"], **TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tp1_checkpoint_split_to_tp2_gives_same_outputs_and_trains_on(tp2, ref, layout):
    r = ref[layout]
    assert not torch.allclose(r["start_eval_loss"], r["eval_loss"])  # really another state
    for rank in range(2):
        torch.testing.assert_close(tp2[rank][layout]["start_eval_loss"], r["start_eval_loss"], **TOL)
        torch.testing.assert_close(tp2[rank][layout]["start_step_loss"], r["start_step_loss"], **TOL)
    after = _merge([tp2[rk][layout]["start_state_after"] for rk in range(2)], layout)
    for name, want in r["start_state_after"].items():
        torch.testing.assert_close(after[name], want, **TOL,
                                   msg=lambda m, name=name: f"{name} after the step: {m}")
