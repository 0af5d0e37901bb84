"""Single-process parts of the tensor-parallel package: state-dict conversion (uneven
vocabulary, errors, command line), the memory planner's command line and arithmetic, and the group builder's errors."""
from __future__ import annotations

import pytest
import torch

from megatron_style.config import model_config
from megatron_style.model import MaskedDataModel
from megatron_style.checkpoint import tp_split as convert
from megatron_style.model import memory_plan
from megatron_style.cli import convert_tp as convert_tp_cli
from megatron_style.cli import memory_plan as memory_plan_cli


# ---- conversion ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_vocab():
    """Tiny layers with the real text vocabulary (64010: uneven over 4 ranks)."""
    cfg = model_config("tiny", text_vocab_size=64010, kernels="reference")
    torch.manual_seed(0)
    return cfg, MaskedDataModel(cfg).state_dict()


def test_split_four_ways_then_merge_is_exact(big_vocab):
    cfg, sd = big_vocab
    shards = convert.split_tp(sd, cfg, 4)
    assert [s["text_head.weight"].shape[0] for s in shards] == [16003, 16003, 16003, 16001]
    assert [s["beit3.text_embed.weight"].shape[0] for s in shards] == [16003, 16003, 16003, 16001]
    assert [s["beit3.layers.0.attn.out_proj.0.weight"].shape for s in shards] == [(64, 16)] * 4
    assert shards[0]["beit3.layers.0.attn.out_proj.0.bias"].shape == (64,)  # replicated
    # slices are copies: saving one shard does not save the whole tensor
    assert shards[1]["text_head.weight"].untyped_storage().nbytes() == 16003 * 64 * 4
    merged = convert.merge_tp(shards, cfg)
    assert merged.keys() == sd.keys()
    assert all(torch.equal(merged[k], sd[k]) for k in sd)
    back = convert.convert_tp(shards, cfg, 2)
    assert [s["text_head.weight"].shape[0] for s in back] == [32005, 32005]


def test_merge_errors_name_the_problem(big_vocab):
    cfg, sd = big_vocab
    shards = convert.split_tp(sd, cfg, 2)
    bad = [dict(s) for s in shards]
    bad[1]["beit3.final_norm.0.weight"] = bad[1]["beit3.final_norm.0.weight"] + 1
    with pytest.raises(ValueError, match=r"beit3.final_norm.0.weight: replicated tensor differs "
                                         r"between tensor rank 0 and rank 1"):
        convert.merge_tp(bad, cfg)
    convert.merge_tp(bad, cfg, check_replicated=False)
    with pytest.raises(ValueError, match=r"text_embed.weight: tensor rank 0 holds shape \(32005, 64\), "
                                         r"expected \(16003, 64\)"):
        convert.merge_tp(shards + shards, cfg)
    with pytest.raises(KeyError, match="'nonsense' is not a parameter"):
        convert.split_tp({**sd, "nonsense": torch.zeros(1)}, cfg, 2)
    with pytest.raises(ValueError, match="tensor-parallel size 3 does not divide model.heads = 4"):
        convert.split_tp(sd, cfg, 3)


def test_encoder_only_state_dicts_convert_too(big_vocab):
    cfg, sd = big_vocab
    enc = {k[len("beit3."):]: v for k, v in sd.items() if k.startswith("beit3.")}
    shards = convert.split_tp(enc, cfg, 2)
    assert shards[0]["text_embed.weight"].shape == (32005, 64)


def test_convert_command_line(tmp_path, big_vocab, capsys):
    cfg, sd = big_vocab
    files = []
    for r, s in enumerate(convert.split_tp(sd, cfg, 2)):
        files.append(str(tmp_path / f"rank{r}.pt"))
        torch.save({"module": s}, files[-1])
    out = tmp_path / "single.pt"
    rc = convert_tp_cli.main(["--preset", "tiny", "--set", "text_vocab_size=64010", "--tensor", "1",
                       *files, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    single = torch.load(out, weights_only=True)
    assert all(torch.equal(single[k], sd[k]) for k in sd)
    rc = convert_tp_cli.main(["--preset", "tiny", "--set", "text_vocab_size=64010", "--tensor", "4",
                       str(out), "--out", str(tmp_path / "tp4")])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "tp4").iterdir()) == [f"tp_rank_0{r}.pt" for r in range(4)]
    rc = convert_tp_cli.main(["--preset", "tiny", "--tensor", "1", *files, "--out", str(out)])
    assert rc == 2 and "wrong model config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        convert_tp_cli.main(["--help"])
    assert e.value.code == 0 and "beit3-convert-tp" in capsys.readouterr().out


# ---- memory planner ------------------------------------------------------------------------

def test_planner_arithmetic():
    cfg = model_config("base")
    mb = memory_plan.MicroBatch(8, 8, 8, 64)
    shapes = memory_plan.local_shapes(cfg, 1)
    p1, p2, p3 = (memory_plan.plan(cfg, 1, z, 4, mb, "bf16", shapes=shapes) for z in (1, 2, 3))
    N = shapes.params
    assert p1.params == 2 * N and p1.grads == 2 * N and p1.optimizer == 12 * N // 4
    assert p2.grads == 2 * N // 4 and p3.params == 2 * N // 4
    assert p1.activations_checkpointed < p1.activations / 5
    tp2 = memory_plan.local_shapes(cfg, 2)
    assert N / 2 < tp2.params < 0.6 * N   # the split part halves, the replicated part stays
    assert tp2.attn_width == 384 and tp2.ffn_width == 1536 and tp2.text_vocab == 32005
    q = memory_plan.plan(cfg, 2, 1, 4, mb, "bf16", shapes=tp2)
    assert q.activations < p1.activations and q.sp_saving > 0
    # activations grow linearly with the tokens of the micro-batch (heads aside)
    a1 = memory_plan.activation_bytes(shapes, cfg, mb, memory_plan.MaskingConfig(), 2, 1)
    a2 = memory_plan.activation_bytes(shapes, cfg, memory_plan.MicroBatch(16, 16, 16, 64),
                                      memory_plan.MaskingConfig(), 2, 1)
    assert a2["tokens"] == 2 * a1["tokens"] and a2["layer"] == pytest.approx(2 * a1["layer"], rel=1e-9)


def test_planner_command_line(capsys):
    rc = memory_plan_cli.main(["--preset", "base", "--gpus", "8", "--tensor", "2", "--zero", "1", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "tensor 2 x data 4" in out and "ZeRO-1" in out and "ZeRO-3" in out
    assert "optimizer (fp32 master + 2 moments)" in out and "activations, checkpointing" in out
    rc = memory_plan_cli.main(["--preset", "base", "--gpus", "6", "--tensor", "4"])
    assert rc == 2 and "--gpus 6 is not a multiple of --tensor 4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        memory_plan_cli.main(["--help"])
    assert e.value.code == 0 and "beit3-memory-plan" in capsys.readouterr().out


# ---- groups --------------------------------------------------------------------------------

def test_build_parallel_state_needs_an_initialised_process_group():
    from megatron_style.parallel.state import build_parallel_state
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialised"):
        build_parallel_state(2)
