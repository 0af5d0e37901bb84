"""skip_update's contract without DeepSpeed (one process): the veto holds for every step() call
inside the block, is cleared after it (also on an exception), and puts the engine's
bookkeeping right. The multi-process check at every ZeRO stage is test_nonfinite_skip.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from megatron_style.config import load_config
from megatron_style.train.engine import base_optimizer, build_optimizer, skip_update

pytestmark = pytest.mark.faults


class FakeEngine:
    """What skip_update reads of a DeepSpeedEngine; step() calls the optimizer once per group,
    as ZeRO-1/2 do."""

    def __init__(self, optimizer, boundary=True):
        self.optimizer, self.boundary = optimizer, boundary
        self.lr_scheduler, self.skipped_steps, self._step_applied = "scheduler", 0, False
        optimizer._hp_optimizer_states_linked = False  # DeepSpeed's ZeRO-1/2 wrapper has it
        self.scheduler_seen = []

    def is_gradient_accumulation_boundary(self):
        return self.boundary

    def step(self, fail=False):
        self.scheduler_seen.append(self.lr_scheduler)
        groups = self.optimizer.param_groups
        for g in list(groups):
            self.optimizer.param_groups = [g]
            self.optimizer.step()
        self.optimizer.param_groups = groups
        self.optimizer._hp_optimizer_states_linked = True
        self._step_applied = True
        if fail:
            raise RuntimeError("boom")


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_optimizer(model, load_config(None, ["optim.lr=0.1"]), torch.device("cpu"))
    assert len(opt.param_groups) == 2
    (model(torch.randn(3, 4)) * torch.randn(3, 4)).sum().backward()
    return model, opt


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def step_under(skip: bool):
    """One engine.step() inside skip_update(engine, skip): (model, opt, engine, weights before)."""
    model, opt = make()
    engine = FakeEngine(opt)
    w0 = weights(model)
    with skip_update(engine, skip):
        engine.step()
    return model, opt, engine, w0


def test_veto_covers_every_group_and_ends_with_the_block():
    model, opt, engine, w0 = step_under(True)
    assert all(torch.equal(a, b) for a, b in zip(w0, weights(model)))
    assert len(opt.state) == 0, "the vetoed step created optimizer state"
    assert engine.skipped_steps == 1 and engine._step_applied is False
    assert engine.lr_scheduler == "scheduler" and engine.scheduler_seen == [None]
    assert opt._hp_optimizer_states_linked is False, "linked to the empty state of a vetoed step"
    engine.step()  # the next step is a normal one: both groups move
    assert all(not torch.equal(a, b) for a, b in zip(w0, weights(model)))
    assert engine.skipped_steps == 1 and opt._hp_optimizer_states_linked is True


def test_no_skip_is_a_plain_step():
    model, opt, engine, w0 = step_under(False)
    assert all(not torch.equal(a, b) for a, b in zip(w0, weights(model)))
    assert engine.skipped_steps == 0 and engine.scheduler_seen == ["scheduler"]


def test_veto_is_cleared_on_an_exception():
    model, opt = make()
    engine = FakeEngine(opt)
    with pytest.raises(RuntimeError, match="boom"):
        with skip_update(engine, True):
            engine.step(fail=True)
    assert engine.lr_scheduler == "scheduler" and engine.skipped_steps == 0
    w0 = weights(model)
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(w0, weights(model)))


def test_veto_outside_an_accumulation_boundary_is_refused():
    _, opt = make()
    with pytest.raises(RuntimeError, match="accumulation boundary"):
        with skip_update(FakeEngine(opt, boundary=False), True):
            pass
    assert base_optimizer(opt)._update_vetoed is False


def test_the_old_one_shot_flag_says_what_replaced_it():
    _, opt = make()
    assert base_optimizer(opt).skip_next is False
    with pytest.raises(AttributeError, match="skip_update"):
        base_optimizer(opt).skip_next = True
