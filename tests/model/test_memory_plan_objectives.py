"""The memory plan counts ITC's and ITM's forwards: the activations they add, checked against
what autograd really keeps for backward on the CPU, the heads' parameters, and a recipe's
stages planned one by one."""
import pytest
import torch

from megatron_style.batch.pack import pack_samples
from megatron_style.batch.synthetic import random_sample
from megatron_style.cli import memory_plan as memory_plan_cli
from megatron_style.config import model_config
from megatron_style.model import memory_plan as mp
from megatron_style.model.pretraining import MaskedDataModel

ALL = mp.Objectives(itc=True, itm=True)


def _saved_bytes(model, batch, weights) -> int:
    """Bytes of every tensor autograd saves for backward in one forward, parameters aside,
    each storage once."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: set = set()

    def pack(t):
        st = t.untyped_storage()
        if t.data_ptr() not in params:
            seen.add((st.data_ptr(), st.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch, weights=weights)
    return sum(n for _, n in seen)


@pytest.mark.parametrize("shape", [{}, {"dim": 128, "heads": 4, "layers": 4, "vl_layers": 2}])
def test_the_objectives_add_what_autograd_keeps(shape):
    """The ratio of (MDM + ITC [+ ITM]) to MDM alone, planned and measured. The CPU's reference
    kernels keep other tensors than the GPU kernels the plan is written for (attention
    probabilities among them), but every forward keeps the same per token, so the ratios
    agree: this fails if a forward is left out or mis-sized (ITM through the top layers only,
    say, or one sample per pair instead of three)."""
    cfg = model_config("tiny", kernels="reference", **shape)
    torch.manual_seed(0)
    model = MaskedDataModel(cfg, None, heads=("itc", "itm"))
    pairs, text_len = 6, 12
    g = torch.Generator().manual_seed(0)
    batch = pack_samples([random_sample(cfg, "pair", text_len, g) for _ in range(pairs)], cfg)
    measured = {w: _saved_bytes(model, batch, w) for w in ((1, 0, 0), (1, 1, 0), (1, 1, 1))}
    shapes = mp.local_shapes(cfg, 1, heads=("itc", "itm"))
    mb = mp.MicroBatch(0, 0, pairs, text_len)
    planned = {w: mp.plan(cfg, 1, 0, 1, mb, "fp32", shapes=shapes, objectives=o).activations
               for w, o in (((1, 0, 0), mp.Objectives()), ((1, 1, 0), mp.Objectives(itc=True)),
                            ((1, 1, 1), ALL))}
    for w in ((1, 1, 0), (1, 1, 1)):
        ratio_measured = measured[w] / measured[(1, 0, 0)]
        ratio_planned = planned[w] / planned[(1, 0, 0)]
        assert ratio_planned == pytest.approx(ratio_measured, rel=0.15), (w, measured, planned)


def test_the_forwards_and_heads_of_each_objective():
    cfg = model_config("base")
    mb = mp.MicroBatch(8, 8, 8, 40)
    n = cfg.image_tokens
    assert mp.Objectives().forwards(cfg, mb) == {"MDM": mb.tokens(cfg)}
    assert ALL.forwards(cfg, mb) == {"MDM": mb.tokens(cfg), "ITC images": 8 * n,
                                     "ITC texts": 8 * 40, "ITM": 3 * 8 * (n + 40)}
    assert mp.Objectives(mdm=False, itc=True).forwards(cfg, mp.MicroBatch(0, 0, 4, 40)) == {
        "ITC images": 4 * n, "ITC texts": 160}
    # the heads' parameters are counted: ITC's two projections, ITM's pooler and head
    bare, held = mp.local_shapes(cfg, 1), mp.local_shapes(cfg, 1, heads=ALL.heads)
    with torch.device("meta"):
        heads = MaskedDataModel(cfg, None, heads=ALL.heads)
    extra = sum(p.numel() for p in [*heads.itc.parameters(), *heads.itm.parameters()])
    assert held.params - bare.params == extra > 2 * cfg.dim ** 2
    # the plan grows by the ITC / ITM activations only; with checkpointing every forward keeps
    # its layer inputs and one (the largest) layer is recomputed
    p0 = mp.plan(cfg, 1, 1, 8, mb, shapes=held)
    p1 = mp.plan(cfg, 1, 1, 8, mb, shapes=held, objectives=ALL)
    assert p1.model_states == p0.model_states
    a0 = mp.activation_bytes(held, cfg, mb, mp.MaskingConfig(), 2, 1)
    a1 = mp.activation_bytes(held, cfg, mb, mp.MaskingConfig(), 2, 1, ALL, 8)
    assert a1["tokens"] == sum(ALL.forwards(cfg, mb).values())
    assert p1.activations - p0.activations == cfg.layers * (a1["layer"] - a0["layer"]) + (
        a1["edges"] - a0["edges"])
    assert p1.activations_checkpointed == (cfg.layers * a1["block_input"] + a1["layer_max"]
                                           + a1["edges"])
    # ITM gathers every rank's images: more ranks, more memory
    a64 = mp.activation_bytes(held, cfg, mb, mp.MaskingConfig(), 2, 1, ALL, 64)
    image = cfg.in_chans * cfg.img_size ** 2 * 2
    assert a64["edges"] - a1["edges"] >= (64 - 8) * 8 * image


def test_a_pooled_step_holds_its_micro_batches_inputs_and_the_step_features():
    cfg = model_config("base")
    mb = mp.MicroBatch(0, 0, 96, 64)
    shapes = mp.local_shapes(cfg, 1, heads=("itc",))
    one, eight = (mp.activation_bytes(shapes, cfg, mb, mp.MaskingConfig(), 2, 1,
                                      mp.Objectives(mdm=False, itc=True, step_pool=k), 8)
                  for k in (1, 8))
    image = cfg.in_chans * cfg.img_size ** 2 * 2
    N, D = 96 * 8, cfg.dim
    assert eight["layer"] == one["layer"]   # the layers see one micro-batch at a time
    assert eight["edges"] - one["edges"] == (7 * 2 * 96 * image + 2 * 8 * N * D * 4
                                             + 2 * 2 * (8 * 96) * (8 * N) * 4)


def test_objective_errors():
    with pytest.raises(ValueError, match="itm draws its negatives from ITC"):
        mp.Objectives(itm=True)
    with pytest.raises(ValueError, match="at least one is needed"):
        mp.Objectives(mdm=False)
    with pytest.raises(ValueError, match=r"\['clip'\]: not known; use mdm, itc, itm"):
        mp.Objectives.named(["mdm", "clip"])


def test_a_recipe_is_planned_stage_by_stage(capsys):
    rc = memory_plan_cli.main(["--config", "configs/pretrain/vlmo_base.yaml", "--gpus", "8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("== stage ") == 3
    assert "32 images + 0 texts + 0 pairs" in out and "0 images + 0 texts + 32 pairs" in out
    assert ("objectives: MDM + ITC + ITM (ITC's negatives pooled over a step of 4 "
            "micro-batches); tokens through the layers per micro-batch") in out
    assert "heaviest: stage 2 'image-text'" in out
    # ITC tuning pools the step: 8 micro-batches on 8 GPUs, none to pool on 64
    rc = memory_plan_cli.main(["--config", "configs/pretrain/itc_tune_base.yaml", "--gpus", "8"])
    out = capsys.readouterr().out
    assert rc == 0 and "ITC's negatives pooled over a step of 8 micro-batches" in out
    rc = memory_plan_cli.main(["--config", "configs/pretrain/itc_tune_base.yaml", "--gpus", "64"])
    out = capsys.readouterr().out
    assert rc == 0 and "objectives: ITC; tokens" in out
    # one micro-batch for the run when it is given, and the objectives asked for
    rc = memory_plan_cli.main(["--preset", "base", "--pairs", "8", "--objective", "mdm", "itc"])
    out = capsys.readouterr().out
    assert rc == 0 and "objectives: MDM + ITC;" in out and "== stage" not in out
    rc = memory_plan_cli.main(["--preset", "base", "--pairs", "0", "--objective", "itc"])
    err = capsys.readouterr().err
    assert rc == 2 and "need pairs, and the micro-batch holds none (give --pairs)" in err
    rc = memory_plan_cli.main(["--preset", "base", "--objective", "itm"])
    assert rc == 2 and "needs itc too" in capsys.readouterr().err
