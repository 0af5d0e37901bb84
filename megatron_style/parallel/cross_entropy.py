"""Cross-entropy over a vocabulary split across tensor-parallel ranks, without ever gathering
the full logits.

Each rank computes logits for its vocabulary rows only ([M, V/T]); three small per-position
reductions across ranks give the loss and the prediction:
  * max logit         (all-reduce MAX, no gradient: it is only a shift for stability),
  * sum of exp        (all-reduce SUM),
  * the target logit  (all-reduce SUM; only the rank holding the target contributes).
The sum-of-exp and the target logit are used identically on every rank downstream (the loss
is replicated), so their backward is the identity (`reduce_from_tp`): each rank's gradient
already is the full gradient with respect to its own partial sum. The hidden states enter
through `copy_to_tp`, whose backward sums the partial input gradients of the vocabulary slices.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_style.parallel.layers import ColumnParallelLinear
from megatron_style.parallel.mappings import TPGroup, copy_to_tp, reduce_from_tp, tp_size


def vocab_parallel_masked_loss(hidden: torch.Tensor, head: ColumnParallelLinear,
                               targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [M, D] (replicated across the head's TP group), targets [M] global ids ->
    (loss [M] fp32, argmax [M] global ids). The head's vocabulary split may be uneven."""
    tp = head.tp
    if tp_size(tp) == 1:
        logits = F.linear(hidden, head.weight, head.bias).float()
        return F.cross_entropy(logits, targets, reduction="none"), logits.detach().argmax(-1)
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets have shape {tuple(targets.shape)}, expected ({hidden.shape[0]},) "
                         "one id per hidden row")
    start, end = head.start, head.end
    logits = F.linear(copy_to_tp(hidden, tp), head.weight, head.bias).float()  # [M, V_local]
    M = logits.shape[0]

    with torch.no_grad():
        local_max = (logits.max(-1).values if end > start
                     else logits.new_full((M,), float("-inf")))
        global_max = local_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp.group)
    shifted = logits - global_max.unsqueeze(-1)

    sum_exp = reduce_from_tp(shifted.exp().sum(-1), tp)

    mine = (targets >= start) & (targets < end)
    local_ids = (targets - start).clamp(0, max(end - start - 1, 0))
    if end > start:
        picked = shifted.gather(1, local_ids.unsqueeze(-1)).squeeze(-1)
        target_logit = reduce_from_tp(torch.where(mine, picked, torch.zeros_like(picked)), tp)
    else:  # a rank without vocabulary rows (tiny vocabularies only) contributes zeros
        target_logit = reduce_from_tp(shifted.sum(-1) * 0.0, tp)

    loss = torch.log(sum_exp) - target_logit
    return loss, _global_argmax(logits.detach(), local_max, start, tp)


def _global_argmax(logits: torch.Tensor, local_max: torch.Tensor, start: int,
                   tp: TPGroup) -> torch.Tensor:
    """Id of the largest logit over the whole vocabulary. Ties go to the lowest id, as
    torch.argmax does, because ranks hold increasing id ranges and max() keeps the first."""
    M = logits.shape[0]
    if logits.shape[1]:
        local_arg = logits.argmax(-1) + start
    else:
        local_arg = torch.zeros(M, dtype=torch.long, device=logits.device)
    # Values and ids travel in one float64 gather (ids below 2^53 are exact in float64).
    mine = torch.stack([local_max.double(), local_arg.double()], dim=0)  # [2, M]
    parts = [torch.empty_like(mine) for _ in range(tp.size)]
    dist.all_gather(parts, mine.contiguous(), group=tp.group)
    both = torch.stack(parts, dim=0)                                      # [T, 2, M]
    best_rank = both[:, 0, :].argmax(dim=0)                               # first max wins
    return both[:, 1, :].gather(0, best_rank.unsqueeze(0)).squeeze(0).long()
