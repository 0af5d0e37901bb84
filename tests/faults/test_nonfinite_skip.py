"""A vetoed step (a non-finite loss on any rank) changes no tensor, at every ZeRO stage and
precision and whatever DeepSpeed's own overflow handling does; the next step is a normal one.

One 2-rank launch (tests/faults/skip_child.py) runs every configuration through the real engine
(engine.build_engine from a PretrainConfig) and records, per rank, every weight, fp32 master
partition, Adam moment and step counter around every step; the tests below read it.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.train.launch import ROOT, explain, free_port

pytestmark = [pytest.mark.faults, pytest.mark.multiproc]

# stage:precision[:variant]; check/nocheck = bf16.check_grad_overflow (ZeRO-1/2 only: ZeRO-0's
# bf16 wrapper and ZeRO-3 always check), fp32acc = BF16_Optimizer, static = fp16 static scale.
CONFIGS = [
    "0:fp32", "0:bf16", "0:fp16", "0:fp16:static",
    "1:fp32", "1:bf16:check", "1:bf16:nocheck", "1:bf16:fp32acc", "1:fp16", "1:fp16:static",
    "2:fp32", "2:bf16:check", "2:bf16:nocheck", "2:fp16", "2:fp16:static",
    "3:fp32", "3:bf16", "3:fp16", "3:fp16:static",
]
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "skip_child.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("nonfinite_skip") / "results.json"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), CHILD,
           "--out", str(out), "--configs", ",".join(CONFIGS)]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and out.is_file(), explain(p)
    return json.loads(out.read_text())["ranks"]


@pytest.mark.parametrize("config", CONFIGS)
def test_vetoed_steps_change_nothing_and_the_next_step_is_normal(results, config):
    for rank, per_rank in enumerate(results):
        r = per_rank[config]
        where = f"{config} rank {rank} ({r.get('wrapper')})"
        assert "error" not in r, f"{where}:\n{r.get('error')}"
        assert all(n > 0 for n in r["tensors"].values()), f"{where}: {r['tensors']}"
        for s in r["steps"]:
            at = f"{where}, step {s['step']} ({s['kind']})"
            if s["kind"] == "normal":
                assert isinstance(s["loss"], float), f"{at}: loss {s['loss']}"
                assert not s["unchanged"], (
                    f"{at}: {s['n_unchanged']} of {s['weights']} weights not updated: {s['unchanged']}")
                assert not s["masters_unchanged"], f"{at}: masters not updated: {s['masters_unchanged']}"
                assert not s["nonfinite"], f"{at}: non-finite tensors: {s['nonfinite']}"
                assert not s["bad_step_counter"], f"{at}: Adam step counters: {s['bad_step_counter']}"
                assert not s["no_state"], f"{at}: masters without Adam state: {s['no_state']}"
                assert s["applied"], f"{at}: DeepSpeed did not apply the update"
            else:
                assert s["compared"] > 0, at
                assert not s["n_changed"], (
                    f"{at}: {s['n_changed']} of {s['compared']} tensors changed: {s['changed']}")
                assert not s["applied"], f"{at}: engine.was_step_applied() is True"
        vetoed = sum(s["kind"] != "normal" for s in r["steps"])
        assert r["skipped_steps"] == vetoed, f"{where}: engine.skipped_steps {r['skipped_steps']} != {vetoed}"
        assert r["global_steps"] == len(r["steps"]), where


@pytest.mark.parametrize("config", [c for c in CONFIGS if not (":fp16" in c and not c.endswith("static"))])
def test_vetoed_steps_leave_nothing_behind(results, config):
    """The run (vetoes between normal steps) ends bit-identical to a run of the normal steps
    alone: no gradient, moment or counter of a vetoed step reaches a later one."""
    for rank, per_rank in enumerate(results):
        ref = per_rank[config]["reference"]
        where = f"{config} rank {rank}"
        assert ref is not None and ref["compared"] > 0, where
        assert not ref["n_differ"], (
            f"{where}: {ref['n_differ']} of {ref['compared']} tensors differ: {ref['differ']}")
        assert ref["unlinked_run"] == ref["unlinked_reference"], (
            f"{where}: weights linked to empty Adam state: {ref['unlinked_run']}")


def test_fp16_dynamic_loss_scale_still_drops_at_overflow(results):
    """DeepSpeed's own overflow skip still does its job under the veto: the scale goes down."""
    for per_rank in results:
        steps = per_rank["1:fp16"]["steps"]
        assert steps[-1]["loss_scale"] < 2 ** 16, steps[-1]


def test_zero_stages_train_the_same_model(results):
    """fp32, same seed, same batches: ZeRO 0, 1, 2 and 3 shard differently but compute the same
    steps, so their losses at every normal step agree (to summation order)."""
    for rank, per_rank in enumerate(results):
        losses = {c: [s["loss"] for s in per_rank[c]["steps"] if s["kind"] == "normal"]
                  for c in ("0:fp32", "1:fp32", "2:fp32", "3:fp32")}
        first = losses["0:fp32"]
        assert len(first) >= 4 and all(isinstance(v, float) for v in first), (rank, first)
        for config, got in losses.items():
            assert got == pytest.approx(first, rel=1e-5), (rank, config, got, first)
