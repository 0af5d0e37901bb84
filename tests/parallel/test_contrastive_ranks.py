"""The image-text contrastive loss across data-parallel ranks equals one process on the union
batch (model/contrastive.py's invariants), on gloo processes in fp32:

  * 2 ranks (one spawn): the mean over ranks of the loss is the one-process loss; the mean
    over ranks of every parameter's gradient (what DeepSpeed's averaging over the
    data-parallel group produces) is the one-process gradient; each rank's local rows get
    W = 2 times their one-process gradient. Unequal local counts (4 + 3 pairs) and a rank with
    no pair (7 + 0). Two ways to get it wrong fail visibly: negatives from the local batch only,
    and a gather whose backward does not sum over the ranks (a no-gradient gather).
  * TP = 2 x DP = 2 (4 ranks, one spawn): features replicated within each tensor group
    (ColumnParallelLinear with gathered output), gathered over the data-parallel group only,
    give the DP-only result; gathering over the world (each pair twice) does not.

Features are random inputs through small linear layers: the loss and its gradients are what
is tested here; the encoder's CLS features are tests/model/test_contrastive.py's."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_style.model import contrastive
from megatron_style.model.contrastive import LOGIT_SCALE_INIT, contrastive_loss
from megatron_style.parallel.layers import ColumnParallelLinear
from tp_launch import run_workers

pytestmark = pytest.mark.multiproc

N, IN, D = 7, 6, 8
SPLITS = {"uneven": (4, 3), "one_empty": (7, 0)}
PARAMS = ("img.weight", "img.bias", "txt.weight", "txt.bias", "logit_scale")


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, IN, generator=g), torch.randn(N, IN, generator=g)


class _Toy(nn.Module):
    """Two projections and a logit scale: the shape of ContrastiveHeads, on raw inputs."""

    def __init__(self, tp=None):
        super().__init__()
        torch.manual_seed(0)
        self.img = ColumnParallelLinear(IN, D, tp=tp, gather_output=True, init_std=0.5)
        self.txt = ColumnParallelLinear(IN, D, tp=tp, gather_output=True, init_std=0.5)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():  # non-zero biases (drawn whole, sliced as the weights are)
            for lin in (self.img, self.txt):
                lin.bias.copy_((torch.rand(D, generator=g) - 0.5)[lin.start:lin.end])
        # Not the init: a gradient of logit_scale that is not tiny.
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT - 1.0))


def _step(rows, tp=None, group=None):
    """Loss, stats and gradients for the pairs `rows` of the union batch."""
    x_img, x_txt = _inputs()
    m = _Toy(tp)
    xi = x_img[rows].clone().requires_grad_()
    xt = x_txt[rows].clone().requires_grad_()
    out = contrastive_loss(F.normalize(m.img(xi), dim=-1), F.normalize(m.txt(xt), dim=-1),
                           m.logit_scale, group)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    return {"loss": out.loss.detach(), "stats": out.stats, "candidates": out.candidates,
            "grads": grads, "dx_img": xi.grad, "dx_txt": xt.grad}


_RIGHT_GATHER = contrastive._GatherRows


class _NoSumGather(torch.autograd.Function):
    """The common mistake: all_gather whose backward keeps the local slice of the local
    gradient only (as a plain dist.all_gather with the local rows put back would)."""

    @staticmethod
    def forward(ctx, x, group, sizes, rank):
        ctx.sizes, ctx.rank = sizes, rank
        return _RIGHT_GATHER.forward(ctx, x, group, sizes, rank)

    @staticmethod
    def backward(ctx, g):
        start = sum(ctx.sizes[:ctx.rank])
        return g[start:start + ctx.sizes[ctx.rank]], None, None, None


def _local(split, rank):
    start = sum(split[:rank])
    return list(range(start, start + split[rank]))


def _dp_worker(rank, world):
    import torch.distributed as dist
    out = {name: _step(_local(split, rank), group=dist.group.WORLD)
           for name, split in SPLITS.items()}
    rows = _local(SPLITS["uneven"], rank)
    out["local_only"] = _step(rows, group=None)
    contrastive._GatherRows = _NoSumGather
    try:
        out["no_sum_gather"] = _step(rows, group=dist.group.WORLD)
    finally:
        contrastive._GatherRows = _RIGHT_GATHER
    return out


def _tp_dp_worker(rank, world):
    import torch.distributed as dist

    from megatron_style.parallel.state import build_parallel_state
    state = build_parallel_state(2)
    rows = _local(SPLITS["uneven"], state.data_rank)   # the same pairs within a tensor group
    out = {"data_rank": state.data_rank, "tensor_rank": state.tensor_rank,
           "dp": _step(rows, state.tp, state.data_group),
           "world": _step(rows, state.tp, dist.group.WORLD)}
    return out


@pytest.fixture(scope="module")
def ref():
    return _step(list(range(N)))


@pytest.fixture(scope="module")
def dp2():
    return run_workers(_dp_worker, 2)


@pytest.fixture(scope="module")
def tp2dp2():
    return run_workers(_tp_dp_worker, 4)


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def _mean(ranks, key, name):
    return torch.stack([r[key]["grads"][name] for r in ranks]).mean(0)


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_loss_and_stats_equal_one_process_on_the_union(dp2, ref, split):
    runs = [r[split] for r in dp2]
    assert [r["candidates"] for r in runs] == [N, N]
    _close(torch.stack([r["loss"] for r in runs]).mean(), ref["loss"], "mean loss over ranks")
    _close(sum(r["stats"] for r in runs), ref["stats"], "stats summed over ranks")
    assert float(ref["stats"][1]) > 0 and float(ref["stats"][1]) < N  # accuracies say something


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("name", PARAMS)
def test_rank_averaged_parameter_gradients_equal_one_process(dp2, ref, split, name):
    # DeepSpeed sums gradients over the data-parallel group and divides by its size.
    assert ref["grads"][name].abs().max() > 1e-4
    _close(_mean(dp2, split, name), ref["grads"][name], f"{name}, split {SPLITS[split]}")


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_local_rows_get_world_times_their_one_process_gradient(dp2, ref, split):
    W = len(dp2)
    for rank, r in enumerate(dp2):
        rows = _local(SPLITS[split], rank)
        for key in ("dx_img", "dx_txt"):
            assert r[split][key].shape[0] == len(rows)
            _close(r[split][key], W * ref[key][rows], f"{key} of rank {rank}")


def test_local_negatives_only_is_a_different_loss(dp2, ref):
    got = torch.stack([r["local_only"]["loss"] for r in dp2]).mean()
    assert (got - ref["loss"]).abs() > 1e-3
    assert [r["local_only"]["candidates"] for r in dp2] == [4, 3]


def test_a_gather_without_summed_gradients_gives_wrong_gradients(dp2, ref):
    # Same forward (same loss), wrong backward: the other ranks' losses never reach the rows.
    _close(torch.stack([r["no_sum_gather"]["loss"] for r in dp2]).mean(), ref["loss"], "loss")
    wrong = _mean(dp2, "no_sum_gather", "img.weight")
    assert (wrong - ref["grads"]["img.weight"]).abs().max() > 1e-3


def test_tp_x_dp_gathers_over_the_data_parallel_group_only(tp2dp2, dp2, ref):
    assert [(r["tensor_rank"], r["data_rank"]) for r in tp2dp2] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    for r in tp2dp2:
        d = r["data_rank"]
        _close(r["dp"]["loss"], dp2[d]["uneven"]["loss"], f"loss of data rank {d}")
        _close(r["dp"]["stats"], dp2[d]["uneven"]["stats"], f"stats of data rank {d}")
        assert r["dp"]["candidates"] == N
        _close(r["dp"]["dx_img"], dp2[d]["uneven"]["dx_img"], f"dx_img of data rank {d}")
    # Sharded weights: average over data ranks, concatenate over tensor ranks.
    for name in PARAMS:
        per_tp = [torch.stack([r["dp"]["grads"][name] for r in tp2dp2 if r["tensor_rank"] == t])
                  .mean(0) for t in (0, 1)]
        full = per_tp[0] if name == "logit_scale" else torch.cat(per_tp)
        if name == "logit_scale":
            _close(per_tp[1], per_tp[0], "logit_scale is replicated")
        _close(full, ref["grads"][name], f"{name} under TP=2 x DP=2")


def test_tp_x_dp_gathering_over_the_world_counts_each_pair_twice(tp2dp2, ref):
    assert all(r["world"]["candidates"] == 2 * N for r in tp2dp2)
    got = torch.stack([r["world"]["loss"] for r in tp2dp2]).mean()
    assert (got - ref["loss"]).abs() > 1e-2
