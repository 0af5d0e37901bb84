"""Tensor-parallel layers, the vocabulary-parallel cross-entropy and the mappings against
their single-process equivalents, forward and backward, on 2 gloo processes (one spawn).

Vocabulary sizes are odd so the split is uneven (rank 0 holds one row more)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.cross_entropy.reference import masked_token_loss
from megatron_style.parallel.cross_entropy import vocab_parallel_masked_loss
from megatron_style.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardedLayerNorm,
    VocabParallelEmbedding,
    shard_range,
)
from megatron_style.parallel.mappings import TPGroup, gather_from_tp, scatter_to_tp
from tp_launch import run_workers

pytestmark = pytest.mark.multiproc

D, V_EMB, V_CE, N_ROWS = 8, 11, 13, 10
USED_ROWS = torch.tensor([0, 2, 3, 5, 8, 9])            # masked positions; rows 1, 4, 6, 7 unused
TARGETS = torch.tensor([0, 6, 7, 12, 3, 7])              # both sides of the 7/6 split boundary
EMB_IDS = torch.tensor([[0, 5, 6, 10], [6, 6, 1, 10]])   # ids 2, 3, 4, 7, 8, 9 never looked up


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(x16=torch.randn(5, 16, generator=g), x12=torch.randn(5, 12, generator=g),
                hidden=torch.randn(N_ROWS, D, generator=g), w_out=torch.randn(5, 10, generator=g),
                w_loss=torch.rand(len(TARGETS), generator=g) + 0.5,
                w_emb=torch.randn(2, 4, D, generator=g))


def _build(tp):
    torch.manual_seed(0)
    return dict(col=ColumnParallelLinear(16, 10, tp=tp, gather_output=True),
                row=RowParallelLinear(12, 10, tp=tp),
                ln=ShardedLayerNorm(12, 1e-5, tp),
                emb=VocabParallelEmbedding(V_EMB, D, tp),
                head=ColumnParallelLinear(D, V_CE, tp=tp))


def _tie_head(tp):
    """A head whose rows 3 (rank 0) and 9 (rank 1) are identical: an exact argmax tie."""
    torch.manual_seed(0)
    head = ColumnParallelLinear(D, V_CE, tp=tp)
    full = torch.zeros(V_CE, D)
    full[3] = full[9] = 1.0
    with torch.no_grad():
        head.weight.copy_(full[head.start:head.end])
    return head


def _run_cases(tp):
    """Every case on this process; returns local outputs and local parameter gradients."""
    x = _inputs()
    m = _build(tp)
    out = {}
    # column-parallel with gathered output
    xi = x["x16"].clone().requires_grad_()
    y = m["col"](xi)
    (y * x["w_out"]).sum().backward()
    out.update(col_y=y.detach(), col_dx=xi.grad, col_dw=m["col"].weight.grad, col_db=m["col"].bias.grad)
    # row-parallel fed by scatter (the input arrives split on its last dimension)
    xi = x["x12"].clone().requires_grad_()
    y = m["row"](scatter_to_tp(xi, tp))
    (y * x["w_out"]).sum().backward()
    out.update(row_y=y.detach(), row_dx=xi.grad, row_dw=m["row"].weight.grad, row_db=m["row"].bias.grad)
    # LayerNorm over a split feature dimension
    xi = x["x12"].clone().requires_grad_()
    y = gather_from_tp(m["ln"](scatter_to_tp(xi, tp)), tp)
    (y * x["x12"].flip(0)).sum().backward()
    out.update(ln_y=y.detach(), ln_dx=xi.grad, ln_dw=m["ln"].weight.grad, ln_db=m["ln"].bias.grad)
    # vocabulary-parallel embedding
    y = m["emb"](EMB_IDS)
    (y * x["w_emb"]).sum().backward()
    out.update(emb_y=y.detach(), emb_dw=m["emb"].weight.grad)
    # vocabulary-parallel masked cross-entropy: only USED_ROWS reach the head
    h = x["hidden"].clone().requires_grad_()
    loss, pred = vocab_parallel_masked_loss(h.index_select(0, USED_ROWS), m["head"], TARGETS)
    (loss * x["w_loss"]).sum().backward()
    out.update(ce_loss=loss.detach(), ce_pred=pred, ce_dh=h.grad, ce_dw=m["head"].weight.grad,
               ce_db=m["head"].bias.grad)
    _, tie_pred = vocab_parallel_masked_loss(x["hidden"].abs(), _tie_head(tp), torch.zeros(N_ROWS, dtype=torch.long))
    out["tie_pred"] = tie_pred
    return out


def _worker(rank, world):
    import torch.distributed as dist
    return _run_cases(TPGroup(dist.group.WORLD, rank, world))


@pytest.fixture(scope="module")
def tp2():
    return run_workers(_worker, 2)


@pytest.fixture(scope="module")
def ref():
    """The single-process equivalents, with the same weights."""
    x = _inputs()
    m = _build(None)
    out = {}
    for name, lin, xin in (("col", m["col"], x["x16"]), ("row", m["row"], x["x12"])):
        xi = xin.clone().requires_grad_()
        y = F.linear(xi, lin.weight, lin.bias)
        (y * x["w_out"]).sum().backward()
        out.update({f"{name}_y": y.detach(), f"{name}_dx": xi.grad, f"{name}_dw": lin.weight.grad,
                    f"{name}_db": lin.bias.grad})
    ln = torch.nn.LayerNorm(12, eps=1e-5)
    xi = x["x12"].clone().requires_grad_()
    y = ln(xi)
    (y * x["x12"].flip(0)).sum().backward()
    out.update(ln_y=y.detach(), ln_dx=xi.grad, ln_dw=ln.weight.grad, ln_db=ln.bias.grad)
    w = m["emb"].weight.detach().clone().requires_grad_()
    y = F.embedding(EMB_IDS, w)
    (y * x["w_emb"]).sum().backward()
    out.update(emb_y=y.detach(), emb_dw=w.grad)
    h = x["hidden"].clone().requires_grad_()
    wh = m["head"].weight.detach().clone().requires_grad_()
    bh = m["head"].bias.detach().clone().requires_grad_()
    loss, pred = masked_token_loss(h.index_select(0, USED_ROWS), wh, bh, TARGETS)
    (loss * x["w_loss"]).sum().backward()
    out.update(ce_loss=loss.detach(), ce_pred=pred, ce_dh=h.grad, ce_dw=wh.grad, ce_db=bh.grad)
    head = _tie_head(None)
    out["tie_pred"] = F.linear(x["hidden"].abs(), head.weight, head.bias).argmax(-1)
    return out


def _close(a, b, name):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


# name -> how the rank-local tensor relates to the full one
REPLICATED = ["col_y", "col_dx", "row_y", "row_dx", "row_db", "ln_y", "ln_dx", "emb_y",
              "ce_loss", "ce_pred", "ce_dh", "tie_pred"]
SPLIT_ROWS = {"col_dw": 10, "col_db": 10, "emb_dw": V_EMB, "ce_dw": V_CE, "ce_db": V_CE}
SPLIT_COLS = {"row_dw": 12}
SPLIT_FEATURES = {"ln_dw": 12, "ln_db": 12}


@pytest.mark.parametrize("name", REPLICATED)
def test_replicated_outputs_match_single_process(tp2, ref, name):
    for rank, out in enumerate(tp2):
        _close(out[name], ref[name], f"{name} on rank {rank}")


@pytest.mark.parametrize("name", sorted({**SPLIT_ROWS, **SPLIT_COLS, **SPLIT_FEATURES}))
def test_sharded_gradients_match_single_process_slices(tp2, ref, name):
    dim = 1 if name in SPLIT_COLS else 0
    _close(torch.cat([out[name] for out in tp2], dim=dim), ref[name], name)


def test_vocab_split_is_uneven_and_covers_the_vocabulary(tp2):
    assert [o["ce_dw"].shape[0] for o in tp2] == [7, 6]
    assert [o["emb_dw"].shape[0] for o in tp2] == [6, 5]


def test_unused_positions_and_ids_get_no_gradient(tp2):
    unused = torch.tensor([1, 4, 6, 7])
    for out in tp2:
        assert out["ce_dh"].index_select(0, unused).abs().max() == 0
        assert out["ce_dh"].index_select(0, USED_ROWS).abs().min() > 0
    emb_dw = torch.cat([o["emb_dw"] for o in tp2])
    never = torch.tensor([2, 3, 4, 7, 8, 9])
    assert emb_dw.index_select(0, never).abs().max() == 0
    assert emb_dw[0].abs().max() > 0


def test_argmax_ties_go_to_the_lowest_id_across_ranks(tp2, ref):
    assert (ref["tie_pred"] == 3).all()
    for out in tp2:
        assert torch.equal(out["tie_pred"], ref["tie_pred"])


@pytest.mark.parametrize("n,size,want", [(64010, 4, [16003, 16003, 16003, 16001]),
                                         (8192, 2, [4096, 4096]), (13, 2, [7, 6])])
def test_shard_range_splits(n, size, want):
    ranges = [shard_range(n, TPGroup(None, r, size)) for r in range(size)]
    assert [b - a for a, b in ranges] == want
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(size - 1))
