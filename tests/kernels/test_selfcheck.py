"""The start-up self-check of the Triton kernels (kernels/selfcheck.py) and what a run does with
it (megatron_style/train/kernel_check.py): a correct kernel passes, a wrong output or a wrong
gradient is caught with its size, the cache is used and invalidated, `auto` falls back on
every rank and a forced `triton` run stops with exit status 2."""
from __future__ import annotations

import json
import os

import pytest
import torch

from kernels import dispatch, selfcheck, triton_support
from megatron_style.config import ConfigError, load_config, model_config
from megatron_style.train import kernel_check
from tests.train.launch import TINY, explain, pretrain, run_dirs

tln = pytest.importorskip("kernels.layernorm.triton_layernorm")
tg = pytest.importorskip("kernels.routed_ffn.triton_grouped")

# Smaller than the tiny model: the single-kernel tests run in a fraction of a second.
SMALL = selfcheck.Shapes(head_dim=16, heads=2, dim=32, ffn_dim=48, experts=3, vocab=50,
                         seq_len=9, tokens=20)
FP32 = torch.float32


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    # No test reads or writes the user's cache, and no disabled kernel outlives its test.
    monkeypatch.setenv(selfcheck.CACHE_ENV, str(tmp_path / "default_cache.json"))
    monkeypatch.delenv(selfcheck.PERTURB_ENV, raising=False)
    yield
    dispatch.enable()


def _counting(monkeypatch, module, name):
    """Wrap module.name so that calls are counted; returns the counter (a one-item list)."""
    calls = [0]
    orig = getattr(module, name)

    def wrapped(*args, **kw):
        calls[0] += 1
        return orig(*args, **kw)

    monkeypatch.setattr(module, name, wrapped)
    return calls


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward scales the gradient: a kernel with a wrong backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 1.02


# ---- what is checked, and against what -----------------------------------------------------

def test_default_shapes_are_the_model_presets():
    # kernels/ cannot read the presets (layering): its giant and tiny defaults must agree.
    assert kernel_check.check_shapes(model_config("giant"), 1) == selfcheck.Shapes()
    assert kernel_check.check_shapes(model_config("tiny"), 1) == selfcheck.TINY
    tp2 = kernel_check.check_shapes(model_config("giant"), 2)
    assert (tp2.heads, tp2.ffn_dim, tp2.vocab) == (8, 3072, 32005)
    assert "masked_token_loss" not in kernel_check.used_kernels(2)


def test_cases_have_an_empty_expert_a_one_token_sample_and_ragged_sizes():
    for experts in (2, 3):
        s = selfcheck.Shapes(experts=experts, tokens=34, seq_len=17)
        assert 0 in s.counts(True) and sum(s.counts(True)) == 34
        assert 0 not in s.counts(False) and sum(s.counts(False)) == 34
    lens = selfcheck.TINY.seq_lens()
    assert 1 in lens and max(lens) == 17 and len(set(lens)) == len(lens)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16])  # fp32: test_the_run_start_up_line_and_metrics
def test_correct_kernels_pass(dtype, device, tmp_path):
    rng = torch.get_rng_state()
    results = selfcheck.run_checks(selfcheck.TINY, [dtype], device, cache_path=str(tmp_path / "c.json"))
    assert torch.equal(torch.get_rng_state(), rng), "the check moved the global RNG"
    assert [r.kernel for r in results] == list(selfcheck.KERNELS)
    for r in results:
        assert r.status == "passed", r.describe()
        assert 0 <= r.max_error <= r.tolerance and r.worst and not r.cached


# ---- wrong kernels are caught ------------------------------------------------------------

@pytest.mark.interpreter
def test_a_wrong_output_is_caught_with_its_size(monkeypatch, device):
    orig = tln.layer_norm

    def off_by_a_bit(x, w, b, eps):
        y = orig(x, w, b, eps)
        bump = torch.zeros_like(y)
        bump[3, 5] = 0.01  # one element, well inside the output's range
        return y + bump

    monkeypatch.setattr(tln, "layer_norm", off_by_a_bit)
    (r,) = selfcheck.run_checks(SMALL, [FP32], device, ["layer_norm"], use_cache=False)
    assert r.status == "failed" and r.worst.startswith("out ")
    assert r.max_error == pytest.approx(0.01, rel=1e-3) and r.tolerance < 1e-3
    assert "failed: max error 0.01 > tolerance" in r.describe()


@pytest.mark.interpreter
def test_a_wrong_gradient_is_caught(monkeypatch, device):
    orig = tg.grouped_layer_norm
    monkeypatch.setattr(tg, "grouped_layer_norm",
                        lambda x, *a: orig(_ScaleGrad.apply(x), *a))  # dx 2% too large
    (r,) = selfcheck.run_checks(SMALL, [FP32], device, ["grouped_layer_norm"], use_cache=False)
    assert r.status == "failed" and r.worst.startswith("dx "), r.describe()
    assert r.max_error > r.tolerance > 0


@pytest.mark.interpreter
def test_an_exception_is_an_error_and_unsupported_inputs_are_skipped(monkeypatch, device):
    def boom(*a):
        raise RuntimeError("illegal memory access\nmore text")

    monkeypatch.setattr(tln, "layer_norm", boom)
    (r,) = selfcheck.run_checks(SMALL, [FP32], device, ["layer_norm"], use_cache=False)
    assert (r.status, r.detail) == ("error", "RuntimeError: illegal memory access") and r.bad
    big = selfcheck.Shapes(head_dim=160, heads=1, dim=32, ffn_dim=32, seq_len=4, tokens=8)
    (r,) = selfcheck.run_checks(big, [FP32], device, ["varlen_attention"], use_cache=False)
    assert r.status == "skipped" and "head dim 160 is above the supported 128" in r.detail
    monkeypatch.setitem(dispatch._loaded, "kernels.layernorm.triton_layernorm", ImportError("no triton"))
    (r,) = selfcheck.run_checks(SMALL, [FP32], device, ["layer_norm"], use_cache=False)
    assert r.status == "skipped" and "Triton is not importable: ImportError: no triton" in r.detail


# ---- the cache -----------------------------------------------------------------------------

@pytest.mark.interpreter
def test_the_cache_is_used_and_invalidated(monkeypatch, device, tmp_path):
    path = str(tmp_path / "sub" / "cache.json")
    calls = _counting(monkeypatch, tln, "layer_norm")

    def check():
        (r,) = selfcheck.run_checks(SMALL, [FP32], device, ["layer_norm"], cache_path=path)
        return r

    first = check()
    n = calls[0]
    assert first.ok and not first.cached and n > 0
    again = check()
    assert calls[0] == n, "a cached result ran the kernel again"
    assert again.cached and (again.status, again.max_error) == (first.status, first.max_error)
    # Any part of the key changing runs the check again: another Triton, an edited kernel.
    monkeypatch.setattr(selfcheck, "triton_version", lambda: "9.9.9")
    assert not check().cached and calls[0] == 2 * n
    assert check().cached and calls[0] == 2 * n
    monkeypatch.setattr(selfcheck, "source_hash", lambda kernel: "edited")
    assert not check().cached and calls[0] == 3 * n
    entries = json.load(open(path))["entries"]
    assert len(entries) == 3 and all("|triton " in k for k in entries)
    assert [f for f in os.listdir(tmp_path / "sub")] == ["cache.json"]  # no temp files left


@pytest.mark.interpreter
@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"entries": 5}', ""])
def test_a_corrupt_cache_is_ignored_and_rewritten(monkeypatch, device, tmp_path, content):
    path = tmp_path / "cache.json"
    path.write_text(content)
    calls = _counting(monkeypatch, tln, "layer_norm")
    (r,) = selfcheck.run_checks(SMALL, [FP32], device, ["layer_norm"], cache_path=str(path))
    assert r.ok and not r.cached and calls[0] > 0
    assert len(json.loads(path.read_text())["entries"]) == 1


@pytest.mark.interpreter
def test_the_env_var_names_the_cache_and_perturbed_checks_are_never_cached(monkeypatch, device, tmp_path):
    monkeypatch.setenv(selfcheck.CACHE_ENV, str(tmp_path / "env.json"))
    assert selfcheck.default_cache_path() == str(tmp_path / "env.json")
    monkeypatch.setenv(selfcheck.PERTURB_ENV, "layer_norm")
    (r,) = selfcheck.run_checks(SMALL, [FP32], device, ["layer_norm"])
    assert r.status == "failed" and r.worst.startswith("out ")
    assert not (tmp_path / "env.json").exists()
    monkeypatch.setenv(selfcheck.PERTURB_ENV, "layer_norm:grad")
    (r,) = selfcheck.run_checks(SMALL, [FP32], device, ["layer_norm"])
    assert r.status == "failed" and r.worst.startswith("dx ")
    monkeypatch.delenv(selfcheck.PERTURB_ENV)
    (r,) = selfcheck.run_checks(SMALL, [FP32], device, ["layer_norm"])
    assert r.ok and (tmp_path / "env.json").exists()


# ---- dispatch and the run ------------------------------------------------------------------

@pytest.mark.interpreter
@pytest.mark.skipif(not triton_support.INTERPRETER, reason="CPU tensors need the interpreter")
def test_disable_takes_a_kernel_out_of_auto_only():
    x, w, b = torch.randn(4, 8), torch.ones(8), torch.zeros(8)
    assert dispatch.triton_available("layer_norm")
    dispatch.disable("layer_norm", "failed its self-check")
    assert dispatch.disabled() == {"layer_norm": "failed its self-check"}
    assert not dispatch.triton_available("layer_norm") and dispatch.triton_available("grouped_linear")
    with dispatch.mode("triton"):  # forced means forced
        assert dispatch.backend("layer_norm", x, w, b) == "triton"
    with pytest.raises(ValueError, match="'padded_attention' has no Triton kernel"):
        dispatch.disable("padded_attention", "x")
    dispatch.enable("layer_norm")
    assert dispatch.disabled() == {}


@pytest.mark.gpu
def test_a_disabled_kernel_runs_the_reference_in_auto_on_cuda():
    x, w, b = (t.cuda().bfloat16() for t in (torch.randn(4, 8), torch.ones(8), torch.zeros(8)))
    with dispatch.mode("auto"):
        assert dispatch.backend("layer_norm", x, w, b) == "triton"
        dispatch.disable("layer_norm", "test")
        assert dispatch.backend("layer_norm", x, w, b) == "reference"


class _Metrics:
    enabled = True

    def __init__(self):
        self.scalars, self.texts = {}, {}
        self.writer = self

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def add_text(self, tag, text, step):
        self.texts[tag] = text


@pytest.mark.interpreter
def test_auto_disables_a_failing_kernel_with_one_line(monkeypatch, device):
    monkeypatch.setenv(selfcheck.PERTURB_ENV, "layer_norm")
    results = selfcheck.run_checks(SMALL, [FP32], device, ["layer_norm", "grouped_layer_norm"])
    lines: list[str] = []
    paths = kernel_check.agree(results, "auto", torch.device(device), lines.append)
    assert paths == {"layer_norm": "reference", "grouped_layer_norm": "triton"}
    assert list(dispatch.disabled()) == ["layer_norm"]
    (line,) = lines
    assert line.startswith(f"WARNING: kernel layer_norm (fp32) self-check on {device} (")
    assert "triton " in line and "failed: max error" in line and "> tolerance" in line
    assert line.endswith("layer_norm falls back to the PyTorch reference")
    with pytest.raises(ConfigError, match=r"^model.kernels: layer_norm \(fp32\) self-check .* failed: "
                                          r"max error .*model.kernels=auto falls back"):
        kernel_check.agree(results, "triton", torch.device(device), lines.append)


@pytest.mark.interpreter
def test_the_run_start_up_line_and_metrics(monkeypatch, device, tmp_path):
    cfg = load_config(None, ["model.preset=tiny", "model.kernels=triton", "parallel.precision=fp32"])
    lines, metrics = [], _Metrics()
    paths = kernel_check.check_kernels(cfg, torch.device(device), None, lines.append, metrics, 7)
    assert paths == {k: "triton" for k in selfcheck.KERNELS}
    (line,) = lines
    assert line.startswith("kernels: self-check ") and f"s on {device}, fp32, shape class " \
        f"{selfcheck.TINY.name()}: varlen_attention triton, grouped_linear triton" in line
    entries = json.load(open(selfcheck.default_cache_path()))["entries"].values()
    assert sorted(e["kernel"] for e in entries) == sorted(selfcheck.KERNELS)
    assert all(e["status"] == "passed" and e["max_error"] <= e["tolerance"] for e in entries)
    assert metrics.scalars["kernels/layer_norm"] == (1.0, 7) and "passed" in metrics.texts["kernels/self_check"]
    # Second start-up: every result from the cache, nothing run.
    calls = _counting(monkeypatch, tln, "layer_norm")
    lines.clear()
    kernel_check.check_kernels(cfg, torch.device(device), None, lines.append)
    assert calls[0] == 0 and "(5 of 5 cached)" in lines[0]
    # The switch: trusted without a check.
    off = load_config(None, ["model.preset=tiny", "model.kernels=triton", "parallel.precision=fp32",
                             "model.kernel_check=false"])
    lines.clear()
    kernel_check.check_kernels(off, torch.device(device), None, lines.append)
    assert calls[0] == 0 and lines[0].endswith("(not self-checked: model.kernel_check=false)")
    # auto on CPU (and fp32 anywhere): nothing runs, one line says so.
    auto = load_config(None, ["model.preset=tiny", "parallel.precision=fp32"])
    lines.clear()
    assert set(kernel_check.check_kernels(auto, torch.device(device), None, lines.append).values()) == {"reference"}
    assert calls[0] == 0 and lines == ["kernels: PyTorch reference throughout (model.kernels=auto, "
                                       f"{torch.device(device).type}, fp32): no Triton kernel in use, "
                                       "nothing to self-check"]


def _two_ranks(rank, world, cache):
    """Rank 1's layer_norm is wrong, rank 0's is not; both must end on the same path."""
    if rank == 1:
        os.environ[selfcheck.PERTURB_ENV] = "layer_norm"
    results = selfcheck.run_checks(SMALL, [FP32], "cpu", ["layer_norm", "grouped_layer_norm"], cache)
    lines: list[str] = []
    paths = kernel_check.agree(results, "auto", torch.device("cpu"), lines.append)
    try:
        kernel_check.agree(results, "triton", torch.device("cpu"), lines.append)
        forced = None
    except ConfigError as e:
        forced = str(e)
    return {"local": {r.kernel: r.status for r in results}, "paths": paths,
            "disabled": sorted(dispatch.disabled()), "lines": lines, "forced": forced}


@pytest.mark.multiproc
@pytest.mark.interpreter
@pytest.mark.skipif(not triton_support.INTERPRETER, reason="CPU tensors need the interpreter")
def test_ranks_with_different_outcomes_take_the_same_path(tmp_path):
    from tests.parallel.tp_launch import run_workers

    r0, r1 = run_workers(_two_ranks, 2, str(tmp_path / "cache.json"))
    assert r0["local"] == {"layer_norm": "passed", "grouped_layer_norm": "passed"}
    assert r1["local"] == {"layer_norm": "failed", "grouped_layer_norm": "passed"}
    for r in (r0, r1):
        assert r["paths"] == {"layer_norm": "reference", "grouped_layer_norm": "triton"}
        assert r["disabled"] == ["layer_norm"]
    # Rank 0 states rank 1's error, and a forced run stops on both ranks with the same message.
    (line,) = r0["lines"]
    assert "failed: max error" in line and "[on rank 1 of 2]" in line
    assert r0["forced"] == r1["forced"] and "[on rank 1 of 2]" in r0["forced"]


@pytest.mark.multiproc
@pytest.mark.interpreter
def test_a_forced_triton_run_stops_with_exit_2(tmp_path):
    # The real entry point, the tiny model; the perturbation makes layer_norm's check fail.
    p = pretrain([*TINY, *run_dirs(tmp_path), "steps=1", "model.kernels=triton"],
                 env={selfcheck.PERTURB_ENV: "layer_norm", selfcheck.CACHE_ENV: str(tmp_path / "c.json")})
    assert p.returncode == 2, explain(p)
    assert "ConfigError: model.kernels: layer_norm (fp32) self-check on " in p.stderr, explain(p)
    assert "failed: max error" in p.stderr and "model.kernels=triton forces" in p.stderr
    assert "step 1/1" not in p.stdout, "a step ran before the check stopped the run"


def test_the_command_prints_a_table_and_exits_1_on_a_failure(monkeypatch, tmp_path, capsys):
    from megatron_style.cli import kernel_check as cli
    args = ["--device", "cpu", "--kernel", "layer_norm", "--dtype", "fp32", "--dim", "32",
            "--tokens", "20", "--cache", str(tmp_path / "c.json")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("device cpu") and "layer_norm" in out and "passed" in out, out
    monkeypatch.setenv(selfcheck.PERTURB_ENV, "layer_norm")
    assert cli.main(args) == 1
    assert "failed" in capsys.readouterr().out
