import math

import pytest

from megatron_style.config import GuardConfig, OptimConfig
from megatron_style.train.guards import LossGuard, TooManyNonFinite
from megatron_style.train.schedule import learning_rate


def test_warmup_then_cosine():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [learning_rate(s, 110, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))          # rising
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))         # then falling
    assert lrs[60] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(110, 110, cfg) == pytest.approx(1e-4)     # the floor


def test_guard_counts_nonfinite_and_stops_after_n_in_a_row():
    g = LossGuard(GuardConfig(max_nonfinite_in_a_row=3))
    g.check(1, 1.0, True)
    g.check(2, float("nan"), False)
    g.check(3, 1.0, True)              # the run of bad steps is broken
    g.check(4, float("nan"), False)
    g.check(5, float("inf"), False)
    with pytest.raises(TooManyNonFinite, match="3 non-finite losses in a row"):
        g.check(6, float("nan"), False)
    assert g.skipped_total == 4


def test_guard_reports_spikes_against_running_mean():
    g = LossGuard(GuardConfig(spike_factor=3.0, spike_window=8))
    for s in range(8):
        assert g.check(s, 2.0 + 0.01 * s, True) is None
    msg = g.check(8, 9.0, True)
    assert msg is not None and "step 8" in msg
    assert g.check(9, 2.1, True) is None


def test_a_new_window_forgets_the_last_stage_loss_level():
    """At a stage boundary the objectives change (ITC and ITM join: the loss triples): the
    running mean starts afresh instead of reporting the new level as a spike."""
    g = LossGuard(GuardConfig(spike_factor=3.0, spike_window=8))
    for step in range(1, 9):
        assert g.check(step, 1.0, True) is None
    assert g.check(9, 4.0, True) is not None     # the old level: a spike
    g.new_window()
    for step in range(10, 14):
        assert g.check(step, 4.0, True) is None
    assert g.spikes == 1 and len(g.recent) == 4
