"""Stagewise training (train/stages.py): the parameter units, the stage plan, and freezing.

Freezing is checked on real DeepSpeed engines (engine.build_engine from a PretrainConfig, tiny
MaskedDataModel, synthetic batches, fp32) at ZeRO 0, 1, 2 and 3, one process: a first step
trains everything (so every group has Adam state), then a stage training the language side
runs 3 steps. Every frozen weight (ZeRO-3: gathered), fp32 master partition and Adam state
tensor must come out bit-identical, every trained one changed; the gradients DeepSpeed receives
for frozen parameters must be zero, and the norm it clips by must be that of the trained
parameters alone, computed on a plain copy of the model for the same batch.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from megatron_style.batch import LANGUAGE, VISION, VL
from megatron_style.config import OptimConfig, PretrainConfig, load_config, model_config
from megatron_style.config.objective import UNITS, ObjectiveConfig, StageConfig
from megatron_style.model import MaskedDataModel
from megatron_style.model.contrastive import ContrastiveHeads
from megatron_style.parallel.mappings import TPGroup
from megatron_style.train import engine as engine_lib
from megatron_style.train import schedule
from megatron_style.train.stages import (STAGE_SEED_SALT, Freezer, Stage, StagePlan,
                                         parameter_unit)

ZERO_STAGES = (0, 1, 2, 3)
TRAINED = ("language_ffn", "text_embed", "language_head")  # VLMo's text stage


class _Matching(nn.Module):
    """Stands in for the ITM head: the layout model/matching.py's has (norm, dense, head)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.dense = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)


def _model(attention="shared", tp=None, heads=True):
    cfg = model_config("tiny", attention=attention, vl_layers=1 if attention == "shared" else 0)
    model = MaskedDataModel(cfg, tp)
    if heads:
        model.itc = ContrastiveHeads(cfg)
        model.itm = _Matching(cfg.dim)
    return model


# ---- parameter units -----------------------------------------------------------------------
def _units_by_structure(model) -> dict[str, set[int]]:
    """The parameters of each unit found from the modules, not from their names."""
    b = model.beit3

    def ids(*mods):
        return {id(p) for m in mods for p in m.parameters()}
    experts = {u: [l.ffn.experts[e] for l in b.layers if len(l.ffn.experts) > e]
               for e, u in ((VISION, "vision_ffn"), (LANGUAGE, "language_ffn"), (VL, "vl_ffn"))}
    return {
        "attention": ids(*[l.attn for l in b.layers]),
        **{u: ids(*mods) for u, mods in experts.items()},
        "vision_embed": ids(b.vision_embed, b.pos_vision),
        "text_embed": ids(b.text_embed, b.pos_text),
        "vision_head": ids(model.image_head, b.final_norm[VISION]),
        "language_head": ids(model.text_head, b.final_norm[LANGUAGE]),
        "itc": ids(model.itc),
        "itm": ids(model.itm),
    }


@pytest.mark.parametrize("attention,tp", [("shared", None), ("decoupled", None),
                                          ("shared", TPGroup(None, 1, 2)),
                                          ("decoupled", TPGroup(None, 0, 2))])
def test_every_parameter_has_the_unit_its_module_says(attention, tp):
    model = _model(attention, tp)
    want = _units_by_structure(model)
    got: dict[str, set[int]] = {u: set() for u in UNITS}
    for name, p in model.named_parameters():
        unit = parameter_unit(name)
        assert parameter_unit("module." + name) == unit, name
        got[unit].add(id(p))
    assert got == want
    assert sum(map(len, got.values())) == len(list(model.parameters()))
    expected_units = set(UNITS) - ({"vl_ffn"} if attention == "decoupled" else set())
    assert {u for u, ps in got.items() if ps} == expected_units


@pytest.mark.parametrize("name", ["beit3.layers.0.gamma", "adapter.weight", "beit3.cls_token",
                                  "beit3.final_norm.2.weight",
                                  "beit3.layers.0.ffn.experts.3.fc1.weight",
                                  "beit3.layers.0.ffn.router.weight", "itc", "module.extra"])
def test_an_unknown_parameter_name_raises(name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        parameter_unit(name)


def test_a_new_parameter_cannot_escape_freezing():
    model = _model(heads=False)
    model.adapter = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"adapter\.weight"):
        engine_lib.param_groups(model, 0.05, by_unit=True)
    with pytest.raises(ValueError, match=r"adapter\.weight"):
        Freezer(model, _optimizer(_model(heads=False), stages=True))


# ---- parameter groups ----------------------------------------------------------------------
def _previous_param_groups(model, weight_decay, decay_embeddings):
    """engine.param_groups before stages existed, as it was."""
    exempt = engine_lib._NO_DECAY_UNILM + (() if decay_embeddings else engine_lib._NO_DECAY_EMBEDDINGS)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(exempt):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def _as_ids(groups):
    return [{k: ([id(p) for p in v] if k == "params" else v) for k, v in g.items()} for g in groups]


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_without_stages_the_groups_are_the_previous_two(decay_embeddings):
    model = _model()
    assert _as_ids(engine_lib.param_groups(model, 0.05, decay_embeddings)) == \
        _as_ids(_previous_param_groups(model, 0.05, decay_embeddings))
    opt = _optimizer(model, stages=False, decay_embeddings=decay_embeddings)
    assert [(g["name"], g["weight_decay"], "unit" in g) for g in opt.param_groups] == \
        [("decay", 0.05, False), ("no_decay", 0.0, False)]
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == \
        [[id(p) for p in g["params"]] for g in _previous_param_groups(model, 0.05, decay_embeddings)]


def test_with_stages_each_group_is_split_by_unit():
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = engine_lib.param_groups(model, 0.05, by_unit=True)
    previous = {g["name"]: {id(p) for p in g["params"]} for g in _previous_param_groups(model, 0.05, True)}
    order = []
    for g in groups:
        kind, unit = g["name"].split("/")
        assert g["unit"] == unit and g["params"], g["name"]
        assert g["weight_decay"] == (0.05 if kind == "decay" else 0.0)
        assert all(parameter_unit(names[id(p)]) == unit for p in g["params"])
        assert {id(p) for p in g["params"]} <= previous[kind]
        order.append((kind, UNITS.index(unit)))
    assert order == sorted(order, key=lambda o: (o[0] != "decay", o[1]))
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(names)
    # logit_scale is 0-d: itc has a no_decay group (with it) as well as a decay one.
    assert {"decay/itc", "no_decay/itc", "decay/attention", "no_decay/attention"} <= {g["name"] for g in groups}


# ---- SkippableStep and Freezer without DeepSpeed -------------------------------------------
def _cfg(stages=(), **over) -> PretrainConfig:
    cfg = load_config(None, ["model.preset=tiny", "data.source=synthetic", "steps=10",
                             *[f"{k}={v}" for k, v in over.items()]])
    if stages:
        cfg = dataclasses.replace(cfg, stages=list(stages))
        cfg.validate()
    return cfg


def _two_stages(steps=(1, 3)):
    return [StageConfig(name="all", steps=steps[0]),
            StageConfig(name="text", steps=steps[1], train=list(TRAINED))]


def _optimizer(model, stages: bool, decay_embeddings=True):
    cfg = _cfg(_two_stages((4, 6)) if stages else (),
               **{"optim.decay_embeddings": str(decay_embeddings).lower()})
    return engine_lib.build_optimizer(model, cfg, torch.device("cpu"))


def _batch(model, seed=0):
    from megatron_style.batch.synthetic import random_batch
    return random_batch(model.cfg, 2, 2, 2, seed=seed)


def test_freezer_zeroes_gradients_and_the_optimizer_leaves_frozen_groups_alone():
    model = _model(heads=False)
    opt = _optimizer(model, stages=True)
    freezer = Freezer(model, opt)
    plan = StagePlan(_cfg(_two_stages((4, 6))))
    names = dict(model.named_parameters())
    freezer.apply(plan.at(0))
    assert freezer.frozen == frozenset()
    model(_batch(model)).loss.backward()
    opt.step()
    opt.zero_grad()
    freezer.apply(plan.at(4))
    assert freezer.frozen == frozenset(UNITS) - set(TRAINED)
    before = {n: p.detach().clone() for n, p in names.items()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in names.items()}
    groups = opt.param_groups
    model(_batch(model, 1)).loss.backward()
    for n, p in names.items():
        frozen = parameter_unit(n) in freezer.frozen
        assert bool((p.grad == 0).all()) == frozen, n
    opt.step()
    assert opt.param_groups is groups and len(groups) > 2  # put back after the step
    for n, p in names.items():
        frozen = parameter_unit(n) in freezer.frozen
        assert torch.equal(p, before[n]) == frozen, n
        assert all(torch.equal(opt.state[p][k], v) for k, v in state[n].items()) == frozen, n
    # A step() on frozen groups only (ZeRO-1/2 call it per group) does nothing at all.
    frozen_only = [g for g in groups if g["unit"] in freezer.frozen]
    opt.param_groups = frozen_only
    with torch.no_grad():
        for g in frozen_only:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
    snap = [p.detach().clone() for g in frozen_only for p in g["params"]]
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(snap, (p for g in frozen_only for p in g["params"])))
    assert opt.param_groups is frozen_only
    opt.param_groups = groups
    # Back to "all": nothing frozen, every gradient flows again.
    freezer.apply(plan.at(0))
    opt.zero_grad()
    model(_batch(model, 2)).loss.backward()
    assert all(bool(p.grad.abs().sum() > 0) for n, p in names.items()
               if parameter_unit(n) in ("attention", "vision_embed")), "hooks still zeroing"


def test_freezer_needs_unit_groups_to_freeze_and_registers_once():
    model = _model(heads=False)
    freezer = Freezer(model, _optimizer(model, stages=False))
    plan = StagePlan(_cfg(_two_stages((4, 6))))
    freezer.apply(plan.at(0))  # nothing to freeze: fine with the two plain groups
    with pytest.raises(RuntimeError, match="not split by unit"):
        freezer.apply(plan.at(5))
    with pytest.raises(RuntimeError, match="Freezer already"):
        Freezer(model, _optimizer(model, stages=True))
    freezer.close()
    Freezer(model, _optimizer(model, stages=True))
    with pytest.raises(RuntimeError, match="no SkippableStep"):
        Freezer(_model(heads=False), torch.optim.SGD(model.parameters(), lr=0.1))


# ---- the plan ------------------------------------------------------------------------------
def test_no_stages_is_one_stage_of_todays_run():
    cfg = _cfg(**{"optim.warmup_steps": 3, "optim.min_lr_ratio": 0.1})
    plan = StagePlan(cfg)
    (st,) = plan.stages
    assert (st.index, st.start, st.end, st.train, st.frozen) == (0, 0, cfg.steps, frozenset(UNITS), frozenset())
    assert st.streams == cfg.data.stream_weights() and st.objective == cfg.objective
    assert plan.boundaries == ()
    assert all(plan.at(s) is st for s in range(cfg.steps + 1))
    assert [plan.learning_rate(s) for s in range(cfg.steps + 1)] == \
        [schedule.learning_rate(s, cfg.steps, cfg.optim) for s in range(cfg.steps + 1)]
    assert plan.data_config(st).data == cfg.data
    assert len(plan.describe().splitlines()) == 1


def _three_stages():
    return [StageConfig(name="vision", steps=4, streams={"image": 1, "text": 0, "pair": 0},
                        train=["attention", "vision_ffn", "vision_embed", "vision_head"],
                        lr=2e-3, warmup_steps=2),
            StageConfig(name="text", steps=3, streams={"image": 0, "text": 1, "pair": 0},
                        train=list(TRAINED)),
            StageConfig(name="pairs", steps=3, streams={"pair": 2},
                        objective=ObjectiveConfig(mdm=1.0, itc=1.0), lr=1e-3)]


def test_plan_stages_boundaries_and_lookup():
    cfg = _cfg(_three_stages(), **{"optim.warmup_steps": 2})
    plan = StagePlan(cfg)
    assert [(s.index, s.name, s.start, s.end, s.steps) for s in plan.stages] == \
        [(0, "vision", 0, 4, 4), (1, "text", 4, 7, 3), (2, "pairs", 7, 10, 3)]
    assert plan.boundaries == (4, 7)
    assert [plan.at(s).index for s in range(11)] == [0] * 4 + [1] * 3 + [2] * 4
    # past the end (a checkpoint of a run given more steps): the last stage, nothing to train
    assert plan.at(11) is plan.at(12) is plan.stages[-1]
    with pytest.raises(ValueError):
        plan.at(-1)
    v, t, p = plan.stages
    assert v.train == {"attention", "vision_ffn", "vision_embed", "vision_head"}
    assert t.frozen == frozenset(UNITS) - set(TRAINED)
    assert p.train == frozenset(UNITS) and p.frozen == frozenset()
    assert v.streams == {"image": 1.0, "text": 0.0, "pair": 0.0}
    assert p.streams == {"image": 1.0, "text": 1.0, "pair": 2.0}  # unnamed: the data section's
    assert v.objective == cfg.objective and p.objective == ObjectiveConfig(mdm=1.0, itc=1.0)
    text = plan.describe().splitlines()
    assert len(text) == 3 and "'text'" in text[1] and "steps 5-7" in text[1]
    assert "own lr" in text[0] and "the run's lr schedule" in text[1]


def test_each_stage_has_its_learning_rate():
    cfg = _cfg(_three_stages(), **{"optim.warmup_steps": 2, "optim.min_lr_ratio": 0.1})
    plan = StagePlan(cfg)
    v_opt = dataclasses.replace(cfg.optim, lr=2e-3, warmup_steps=2)
    p_opt = dataclasses.replace(cfg.optim, lr=1e-3, warmup_steps=0)
    want = ([schedule.learning_rate(s, 4, v_opt) for s in range(4)]
            + [schedule.learning_rate(s, 10, cfg.optim) for s in range(4, 7)]
            + [schedule.learning_rate(s - 7, 3, p_opt) for s in range(7, 11)])
    got = [plan.learning_rate(s) for s in range(11)]
    assert got == want
    # The stage's own warmup restarts from its start, and its cosine ends at its end.
    assert got[0] == pytest.approx(1e-3) and got[1] == pytest.approx(2e-3)
    assert got[7] == pytest.approx(1e-3) and got[10] == pytest.approx(1e-4)
    assert isinstance(cfg.optim, OptimConfig) and cfg.optim.lr == 1e-3  # the run's left alone


def test_data_config_per_stage():
    cfg = _cfg(_three_stages(), **{"data.seed": 7})
    plan = StagePlan(cfg)
    datas = [plan.data_config(s).data for s in plan.stages]
    assert [d.stream_weights() for d in datas] == [s.streams for s in plan.stages]
    assert [d.seed for d in datas] == [7, 7 + STAGE_SEED_SALT, 7 + 2 * STAGE_SEED_SALT]
    assert cfg.data.seed == 7 and cfg.data.stream_weights() == {"image": 1.0, "text": 1.0, "pair": 1.0}
    for d in datas:
        assert dataclasses.replace(d, seed=7, image=cfg.data.image, text=cfg.data.text,
                                   pair=cfg.data.pair) == cfg.data  # nothing else moved
    assert datas[0].stream_counts()["text"] == 0 and datas[1].stream_counts()["image"] == 0
    assert plan.data_config(plan.stages[0]).model == cfg.model


def test_stage_is_what_the_plan_returns():
    st = StagePlan(_cfg()).at(0)
    assert isinstance(st, Stage) and st.lr == 0.0 and st.warmup_steps == 0


# ---- DeepSpeed engines ---------------------------------------------------------------------
def _engine_cfg(zero: int) -> PretrainConfig:
    # lr 0.02, eps 1e-12: every trained weight moves visibly at every step; weight decay and
    # clipping at their defaults (0.05, 3.0), so that both are exercised.
    cfg = load_config(None, ["model.preset=tiny", "data.source=synthetic", "data.micro_batch_size=6",
                             "data.synthetic_text_len=12", f"parallel.zero_stage={zero}",
                             "parallel.precision=fp32", "optim.lr=0.02", "optim.eps=1e-12",
                             "optim.warmup_steps=0", "steps=4"])
    cfg = dataclasses.replace(cfg, stages=_two_stages((1, 3)))
    cfg.validate()
    return cfg


def _masters(outer, base, zero):
    """(unit, fp32 tensor the optimizer steps) for this rank's partitions."""
    groups = base.param_groups
    if zero == 3:
        return [(groups[outer.sub_group_to_group_id[i]]["unit"], m)
                for i, m in enumerate(outer.fp32_partitioned_groups_flat)]
    if zero in (1, 2):
        return [(groups[i]["unit"], m) for i, m in enumerate(outer.single_partition_of_fp32_groups)]
    return [(g["unit"], p) for g in groups for p in g["params"]]


def _snapshot(engine, zero):
    import deepspeed

    named = list(engine.module.named_parameters())
    weights = {}
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=zero == 3):
        for n, p in named:
            weights[n] = p.detach().clone()
    base = engine_lib.base_optimizer(engine.optimizer)
    masters = {}
    for i, (unit, m) in enumerate(_masters(engine.optimizer, base, zero)):
        masters[f"{i}:{unit}"] = {"master": m.detach().clone(),
                                  **{k: (v.detach().clone() if torch.is_tensor(v) else torch.tensor(v))
                                     for k, v in base.state.get(m, {}).items()}}
    return weights, masters


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def _engine_worker(rank, world, zeros):
    import deepspeed
    import deepspeed.runtime.engine as ds_engine

    from megatron_style.data.synthetic_loader import SyntheticLoader

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    device = torch.device("cpu")
    out = {}
    clipped = []
    clip = ds_engine.clip_grad_norm_

    def recording_clip(*args, **kwargs):
        norm = clip(*args, **kwargs)
        clipped.append(float(norm))
        return norm
    ds_engine.clip_grad_norm_ = recording_clip  # this process only (a spawned worker)
    for zero in zeros:
        cfg = _engine_cfg(zero)
        plan = StagePlan(cfg)
        loader = SyntheticLoader(cfg, 0, 1)
        torch.manual_seed(0)
        model = MaskedDataModel(cfg.model)
        # What each parameter's gradient is before freezing (registered first) and what is
        # accumulated into .grad, where DeepSpeed's hooks take it (registered after the Freezer's).
        raw, seen = {}, {}

        def watch(store, name):
            def hook(g):
                store[name] = max(store.get(name, 0.0), float(g.abs().max()))
            return hook
        for n, p in model.named_parameters():
            p.register_hook(watch(raw, n))
        # Before ZeRO-3 partitions the weights (to empty tensors: ndim 1, all "no_decay").
        want_groups = [(g["name"], g["unit"]) for g in
                       engine_lib.param_groups(model, cfg.optim.weight_decay, True, by_unit=True)]
        engine, _ = engine_lib.build_engine(model, cfg, device)
        freezer = Freezer(engine.module, engine.optimizer)
        for n, p in model.named_parameters():
            p.register_hook(watch(seen, n))
        base = engine_lib.base_optimizer(engine.optimizer)
        res = {"wrapper": type(engine.optimizer).__name__,
               "groups": [(g.get("name"), g.get("unit")) for g in base.param_groups],
               "want_groups": want_groups,
               "norms": []}
        ref = MaskedDataModel(cfg.model)
        for step in range(cfg.steps):
            stage = plan.at(step)
            freezer.apply(stage)
            engine_lib.set_learning_rate(engine.optimizer, plan.learning_rate(step))
            batch = loader.batch(step)
            if step == 1:  # the first frozen step starts from here
                res["before"] = _snapshot(engine, zero)
                raw.clear()
                seen.clear()
            if step >= 1:
                # The same weights in a plain copy, the same batch: the norm over what trains.
                ref.load_state_dict(_snapshot(engine, zero)[0])
                ref.zero_grad(set_to_none=True)
                ref(batch).loss.backward()
                grads = dict(ref.named_parameters())
                trained = [p.grad for n, p in grads.items() if parameter_unit(n) in stage.train]
                ref_trained, ref_all = _norm(trained), _norm(p.grad for p in grads.values())
            loss = engine(batch).loss
            engine.backward(loss)
            clipped.clear()
            engine.step()
            if step >= 1:
                # ZeRO-0 fp32 keeps no norm (get_global_grad_norm() is None): the one its
                # clip_grad_norm_ returned, recorded on the way.
                ds_norm = engine.get_global_grad_norm() if zero else clipped[0]
                res["norms"].append((float(ds_norm), ref_trained, ref_all))
        res["after"] = _snapshot(engine, zero)
        res["frozen"] = sorted(freezer.frozen)
        res["raw"], res["seen"] = dict(raw), dict(seen)
        out[zero] = res
        engine.destroy()
        del engine, freezer, model
    return out


@pytest.fixture(scope="module")
def engines():
    from tests.parallel.tp_launch import run_workers
    return run_workers(_engine_worker, 1, ZERO_STAGES)[0]


@pytest.mark.multiproc
@pytest.mark.parametrize("zero", ZERO_STAGES)
def test_frozen_units_stay_bit_identical_at_every_zero_stage(engines, zero):
    r = engines[zero]
    frozen = set(UNITS) - set(TRAINED)
    assert set(r["frozen"]) == frozen
    assert r["groups"] == r["want_groups"], "DeepSpeed lost the groups' name / unit keys"
    (w0, m0), (w1, m1) = r["before"], r["after"]
    n_frozen = [n for n in w0 if parameter_unit(n) in frozen]
    assert n_frozen and len(n_frozen) < len(w0)
    changed = [n for n in n_frozen if not torch.equal(w0[n], w1[n])]
    assert not changed, f"{r['wrapper']}: frozen weights changed: {changed}"
    still = [n for n in w0 if n not in n_frozen and torch.equal(w0[n], w1[n])]
    assert not still, f"{r['wrapper']}: trained weights unchanged: {still}"
    assert set(m0) == set(m1)
    for key in m0:
        unit = key.split(":")[1]
        assert {"master", "exp_avg", "exp_avg_sq", "step"} <= set(m0[key]), (key, sorted(m0[key]))
        if unit in frozen:
            moved = [k for k, v in m0[key].items() if not torch.equal(v, m1[key][k])]
            assert not moved, f"{r['wrapper']}: {key}: {moved} changed while frozen"
        else:
            assert not torch.equal(m0[key]["master"], m1[key]["master"]), key
            assert not torch.equal(m0[key]["exp_avg"], m1[key]["exp_avg"]), key
            assert float(m1[key]["step"]) == float(m0[key]["step"]) + 3, key


@pytest.mark.multiproc
@pytest.mark.parametrize("zero", ZERO_STAGES)
def test_frozen_gradients_are_zero_and_the_clip_norm_is_the_trained_ones(engines, zero):
    r = engines[zero]
    frozen = set(UNITS) - set(TRAINED)
    names = list(r["raw"])
    assert set(names) == set(r["seen"]) == set(r["before"][0])
    # Without the hooks the frozen parameters would have had gradients ...
    assert sum(r["raw"][n] > 0 for n in names if parameter_unit(n) in frozen) > 10
    # ... what reached DeepSpeed for them is zero, and the trained ones' came through.
    leaked = [n for n in names if parameter_unit(n) in frozen and r["seen"][n] != 0]
    assert not leaked, leaked
    assert all(r["seen"][n] == r["raw"][n] for n in names if parameter_unit(n) not in frozen)
    assert len(r["norms"]) == 3
    for ds, trained, everything in r["norms"]:
        # DeepSpeed sums the norm in fp32 (ZeRO-0's clip_grad_norm_: per-parameter norms,
        # squared and summed: seen 9e-7 off the fp64 reference here; ZeRO-1/2 1e-7, ZeRO-3 0).
        assert ds == pytest.approx(trained, rel=2e-6, abs=0), (r["wrapper"], r["norms"])
        assert everything > trained * 1.01  # the frozen ones would have counted
