"""Masked-token loss without the [tokens, vocabulary] logits matrix.

    masked_token_loss(hidden [M, D], weight [V, D], bias [V] | None, targets [M])
        -> (loss [M] fp32, argmax [M] int64)

The vocabulary is walked in chunks of C columns. For each chunk the logits h W_c^T + b_c are
made by a cuBLAS GEMM (torch.addmm) in the input dtype, exactly as the reference's F.linear
rounds them, and one Triton pass folds the chunk into a running (max, sum of exponentials,
target logit, best logit, best index) per row: an online log-sum-exp. Only one chunk of logits
is alive at a time. The backward recomputes each chunk's logits from the saved log-sum-exp,
turns them in place into dL/dlogits = (softmax - onehot) * dloss with one Triton pass, and
feeds them to three GEMMs: dW_c (written straight into its slice of dW), dh (accumulated in
fp32) and db_c.

Why cuBLAS GEMMs plus Triton for the softmax parts rather than one fused Triton kernel: the
GEMMs are nearly all of the work (2 M V D flops each, four of them with the recompute) and
cuBLAS runs them at peak; a fused kernel would save only the write and read of one chunk of
logits (~2 x 2 M C bytes, a few percent of the GEMM time at D = 1408), at the cost of writing
and tuning our own GEMM with an online-softmax epilogue and a split reduction for dW.

Targets equal to -100 (torch's ignore_index) give loss 0 and no gradient, as in the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.triton_support import device_problem, dtype_problem

IGNORE_INDEX = -100
# Logits alive at once: at most this many elements per chunk (32 MiB in bf16) ...
CHUNK_ELEMENTS = 1 << 24
# ... but never fewer columns than this (narrow chunks make poor GEMMs).
MIN_CHUNK = 1024


@triton.jit
def _chunk_fwd(LOGITS, TARGETS, RUN_MAX, RUN_SUM, TGT, BEST, BEST_IDX, v0, C, stride_l,
               BLOCK_V: tl.constexpr):
    """Fold columns [v0, v0 + C) of one row into its running statistics."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row)
    base = LOGITS + row * stride_l
    m = tl.load(RUN_MAX + row)
    s = tl.load(RUN_SUM + row)
    t = tl.load(TGT + row)
    best = tl.load(BEST + row)
    best_idx = tl.load(BEST_IDX + row)
    for c0 in range(0, C, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        cmask = cols < C
        x = tl.load(base + cols, mask=cmask, other=float("-inf")).to(tl.float32)
        bmax = tl.max(x, 0)
        # Strictly greater: on ties the earlier column wins, as torch.argmax does.
        bidx = tl.argmax(x, 0)
        if bmax > best:
            best = bmax
            best_idx = (v0 + c0 + bidx).to(tl.int64)
        m_new = tl.maximum(m, bmax)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
        t += tl.sum(tl.where(cmask & (cols + v0 == target), x, 0.0), 0)
    tl.store(RUN_MAX + row, m)
    tl.store(RUN_SUM + row, s)
    tl.store(TGT + row, t)
    tl.store(BEST + row, best)
    tl.store(BEST_IDX + row, best_idx)


@triton.jit
def _chunk_bwd(LOGITS, TARGETS, LSE, DLOSS, v0, C, stride_l, ignore_index, BLOCK_V: tl.constexpr):
    """In place: logits of columns [v0, v0 + C) -> (softmax - onehot(target)) * dloss."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row)
    lse = tl.load(LSE + row)
    g = tl.load(DLOSS + row).to(tl.float32)
    g = tl.where(target == ignore_index, 0.0, g)
    base = LOGITS + row * stride_l
    for c0 in range(0, C, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        mask = cols < C
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse) - tl.where(cols + v0 == target, 1.0, 0.0)
        tl.store(base + cols, (p * g).to(LOGITS.dtype.element_ty), mask=mask)


def chunk_columns(M: int, V: int) -> int:
    """Vocabulary columns per chunk: the whole vocabulary when it is small enough, else as many
    as CHUNK_ELEMENTS allows (a multiple of 256, at least MIN_CHUNK)."""
    if M * V <= CHUNK_ELEMENTS:
        return V
    c = max(MIN_CHUNK, (CHUNK_ELEMENTS // max(M, 1)) // 256 * 256)
    return min(V, c)


def _block_v(C: int) -> int:
    return min(4096, triton.next_power_of_2(C))


def _logits(h, w, b, v0, v1, out):
    """Chunk logits in the input dtype, as F.linear would give them."""
    if b is None:
        return torch.mm(h, w[v0:v1].t(), out=out)
    return torch.addmm(b[v0:v1], h, w[v0:v1].t(), out=out)


def _forward(h, w, b, targets, chunk):
    M, V = h.shape[0], w.shape[0]
    dev = h.device
    run_max = torch.full((M,), float("-inf"), dtype=torch.float32, device=dev)
    run_sum = torch.zeros(M, dtype=torch.float32, device=dev)
    tgt = torch.zeros(M, dtype=torch.float32, device=dev)
    best = torch.full((M,), float("-inf"), dtype=torch.float32, device=dev)
    best_idx = torch.zeros(M, dtype=torch.int64, device=dev)
    buf = torch.empty(M, min(chunk, V), dtype=h.dtype, device=dev)
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        logits = _logits(h, w, b, v0, v1, buf[:, : v1 - v0])
        _chunk_fwd[(M,)](logits, targets, run_max, run_sum, tgt, best, best_idx, v0, v1 - v0,
                         logits.stride(0), BLOCK_V=_block_v(v1 - v0))
    lse = run_max + torch.log(run_sum)
    loss = torch.where(targets == IGNORE_INDEX, torch.zeros_like(lse), lse - tgt)
    return loss, best_idx, lse


def _backward(h, w, b, targets, lse, dloss, chunk):
    M, V = h.shape[0], w.shape[0]
    dh = torch.zeros(M, h.shape[1], dtype=torch.float32, device=h.device)
    dw = torch.empty_like(w)
    db = torch.empty_like(b) if b is not None else None
    buf = torch.empty(M, min(chunk, V), dtype=h.dtype, device=h.device)
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        g = _logits(h, w, b, v0, v1, buf[:, : v1 - v0])
        _chunk_bwd[(M,)](g, targets, lse, dloss, v0, v1 - v0, g.stride(0), IGNORE_INDEX,
                         BLOCK_V=_block_v(v1 - v0))
        torch.mm(g.t(), h, out=dw[v0:v1])
        if db is not None:
            db[v0:v1] = g.sum(0, dtype=torch.float32)
        if h.dtype == torch.float32:
            dh.addmm_(g, w[v0:v1])
        else:
            dh += torch.mm(g, w[v0:v1]).float()
    return dh.to(h.dtype), dw, db


class _MaskedTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, targets, chunk):
        loss, argmax, lse = _forward(h, w, b, targets, chunk)
        ctx.save_for_backward(h, w, b, targets, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(argmax)
        return loss, argmax

    @staticmethod
    def backward(ctx, dloss, _dargmax):
        h, w, b, targets, lse = ctx.saved_tensors
        dh, dw, db = _backward(h, w, b, targets, lse, dloss.contiguous().float(), ctx.chunk)
        return dh, dw, db, None, None


def masked_token_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      targets: torch.Tensor, chunk: Optional[int] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [M, D], weight [V, D], bias [V], targets [M] -> (loss [M] fp32, argmax [M]).
    `chunk`: vocabulary columns per chunk (default: chunk_columns(M, V))."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [M, D] and weight [V, D]; got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    M, V = hidden.shape[0], weight.shape[0]
    if targets.shape != (M,):
        raise ValueError(f"targets must be [{M}] (one per hidden row), got {tuple(targets.shape)}")
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"bias must be [{V}], got {tuple(bias.shape)}")
    problem = unsupported(hidden, weight, bias, targets)
    if problem:
        raise ValueError(f"masked_token_loss (Triton): {problem}")
    if not targets.is_cuda and M:
        bad = targets[(targets != IGNORE_INDEX) & ((targets < 0) | (targets >= V))]
        if bad.numel():
            raise ValueError(f"target {int(bad[0])} is outside the vocabulary [0, {V})")
    chunk = chunk_columns(M, V) if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 vocabulary columns, got {chunk}")
    if M == 0:
        # Still part of the graph, so every parameter gets a (zero) gradient.
        zero = (hidden.sum() + weight.sum() + (bias.sum() if bias is not None else 0)) * 0.0
        return zero.float().expand(0), torch.zeros(0, dtype=torch.int64, device=hidden.device)
    h = hidden.contiguous()
    return _MaskedTokenLoss.apply(h, weight.contiguous(), bias, targets.contiguous(), chunk)


def unsupported(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why the kernel cannot take these inputs, or None."""
    problem = device_problem(hidden, weight, bias, targets) or dtype_problem(hidden, weight, bias)
    if problem:
        return problem
    if targets is not None and targets.dtype not in (torch.int64, torch.int32):
        return f"targets have dtype {targets.dtype}; expected int64 or int32"
    return None


def why_unsupported(fn: str, *args) -> Optional[str]:
    """The dispatch protocol: masked_token_loss(hidden, weight, bias, targets)."""
    if fn != "masked_token_loss":
        return f"{fn} is not implemented in this module"
    return unsupported(*args)


def supports(fn: str, *tensors: torch.Tensor) -> bool:
    return why_unsupported(fn, *tensors) is None
