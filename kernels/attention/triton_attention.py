"""Attention over packed variable-length sequences, FlashAttention-2 style, in Triton.

    varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale) -> o      q, k, v, o: [T, H, D]

Sample s owns tokens [cu_seqlens[s], cu_seqlens[s+1]) and attends only inside them
(non-causal, no dropout). The forward keeps a running max and sum per query row (online
softmax, base 2) so the L x L score matrix never exists in memory; it stores o and the
log-sum-exp per row. The backward recomputes the probabilities from that log-sum-exp in two
kernels, one per key block (dK, dV) and one per query block (dQ): no atomics, deterministic, at
the price of recomputing Q K^T and dO V^T once more (FA2 accumulates dQ with atomics instead).

Two choices aimed at the giant's shapes (16 heads of dim 88, samples of 257 tokens):

* Head dim in power-of-two chunks. Triton tiles must be powers of two; padding 88 to 128 would
  cost 45% more matrix work. Each head is split into D0 + D1 columns (88 = 64 + 32, the last 8
  masked), every product is done per chunk (S = Q0 K0^T + Q1 K1^T; O0 = P V0, O1 = P V1), so
  the work is that of 96 columns. See triton_support.head_dim_chunks.
* Tails in small tiles. 257 = 2 x 128 + 1: a third full 128-row tile for one row would do 50%
  more work on that sample. A program whose rows (or keys) left over number at most TAIL (16)
  uses a TAIL-sized tile instead, so the giant's image samples cost 2 x 128 + 16 rows and
  4 x 64 + 16 keys instead of 384 x 320. Full key blocks skip the score mask entirely.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.triton_support import (
    configs,
    device_problem,
    dot_precision,
    dtype_problem,
    head_dim_chunks,
)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
TAIL = 16  # rows / keys handled by the small tile; tl.dot needs every dimension >= 16


# ---- shared loads -----------------------------------------------------------------------------

@triton.jit
def _program_sample(CU):
    """The sample (grid axis 1) and head (axis 2) of this program: its first token in the packed
    stream, its length and the head index (int64: token x stride can pass 2^31)."""
    seq = tl.program_id(1)
    start = tl.load(CU + seq).to(tl.int64)
    L = (tl.load(CU + seq + 1) - start).to(tl.int32)
    return start, L, tl.program_id(2).to(tl.int64)


@triton.jit
def _backward_inputs(Q, K, V, DO, LSE, DELTA, start, head, T, stride_qt, stride_kt, stride_vt,
                     stride_dt, HEAD_DIM: tl.constexpr):
    """Where one sample's head starts in q, k, v, dO, and in the row statistics."""
    col = head * HEAD_DIM
    return (Q + start * stride_qt + col, K + start * stride_kt + col,
            V + start * stride_vt + col, DO + start * stride_dt + col,
            LSE + head * T + start, DELTA + head * T + start)


@triton.jit
def _load_rows(base, stride_t, offs_t, tmask, col0, COLS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """[len(offs_t), COLS] tile: tokens offs_t, head-dim columns col0 .. col0+COLS."""
    d = col0 + tl.arange(0, COLS)
    return tl.load(base + offs_t[:, None] * stride_t + d[None, :],
                   mask=tmask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _load_cols(base, stride_t, offs_t, tmask, col0, COLS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The transposed tile, [COLS, len(offs_t)]."""
    d = col0 + tl.arange(0, COLS)
    return tl.load(base + offs_t[None, :] * stride_t + d[:, None],
                   mask=tmask[None, :] & (d[:, None] < HEAD_DIM), other=0.0)


@triton.jit
def _store_rows(base, stride_t, offs_t, tmask, col0, x, COLS: tl.constexpr, HEAD_DIM: tl.constexpr):
    d = col0 + tl.arange(0, COLS)
    tl.store(base + offs_t[:, None] * stride_t + d[None, :], x.to(base.dtype.element_ty),
             mask=tmask[:, None] & (d[None, :] < HEAD_DIM))


# ---- forward ----------------------------------------------------------------------------------

@triton.jit
def _fwd_step(q0, q1, Kb, Vb, stride_kt, stride_vt, n0, L, scale_log2, m_i, l_i, acc0, acc1,
              COLS: tl.constexpr, MASK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
              D1: tl.constexpr, HAS_D1: tl.constexpr, PREC: tl.constexpr):
    """One block of COLS keys folded into the running softmax of a query tile."""
    offs_n = n0 + tl.arange(0, COLS)
    nmask = offs_n < L
    kT0 = _load_cols(Kb, stride_kt, offs_n, nmask, 0, D0, HEAD_DIM)
    s = tl.dot(q0, kT0, input_precision=PREC)
    if HAS_D1:
        kT1 = _load_cols(Kb, stride_kt, offs_n, nmask, D0, D1, HEAD_DIM)
        s = tl.dot(q1, kT1, s, input_precision=PREC)
    s = s * scale_log2
    if MASK_N:
        s = tl.where(nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v0 = _load_rows(Vb, stride_vt, offs_n, nmask, 0, D0, HEAD_DIM)
    p = p.to(v0.dtype)
    acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PREC)
    if HAS_D1:
        v1 = _load_rows(Vb, stride_vt, offs_n, nmask, D0, D1, HEAD_DIM)
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PREC)
    return m_new, l_i, acc0, acc1


@triton.jit
def _fwd_tile(Qb, Kb, Vb, Ob, LSEb, stride_qt, stride_kt, stride_vt, stride_ot, m0, L, scale_log2,
              ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
              HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
              PREC: tl.constexpr):
    offs_m = m0 + tl.arange(0, ROWS)
    mmask = offs_m < L
    q0 = _load_rows(Qb, stride_qt, offs_m, mmask, 0, D0, HEAD_DIM)
    q1 = q0
    if HAS_D1:
        q1 = _load_rows(Qb, stride_qt, offs_m, mmask, D0, D1, HEAD_DIM)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc0 = tl.zeros([ROWS, D0], tl.float32)
    acc1 = tl.zeros([ROWS, D1], tl.float32)
    n_full = L // BLOCK_N
    for j in range(0, n_full):
        m_i, l_i, acc0, acc1 = _fwd_step(q0, q1, Kb, Vb, stride_kt, stride_vt, j * BLOCK_N, L,
                                         scale_log2, m_i, l_i, acc0, acc1, BLOCK_N, False,
                                         HEAD_DIM, D0, D1, HAS_D1, PREC)
    rest = L - n_full * BLOCK_N
    if rest > TAIL_N:
        m_i, l_i, acc0, acc1 = _fwd_step(q0, q1, Kb, Vb, stride_kt, stride_vt, n_full * BLOCK_N, L,
                                         scale_log2, m_i, l_i, acc0, acc1, BLOCK_N, True,
                                         HEAD_DIM, D0, D1, HAS_D1, PREC)
    elif rest > 0:
        m_i, l_i, acc0, acc1 = _fwd_step(q0, q1, Kb, Vb, stride_kt, stride_vt, n_full * BLOCK_N, L,
                                         scale_log2, m_i, l_i, acc0, acc1, TAIL_N, True,
                                         HEAD_DIM, D0, D1, HAS_D1, PREC)
    inv_l = 1.0 / l_i
    _store_rows(Ob, stride_ot, offs_m, mmask, 0, acc0 * inv_l[:, None], D0, HEAD_DIM)
    if HAS_D1:
        _store_rows(Ob, stride_ot, offs_m, mmask, D0, acc1 * inv_l[:, None], D1, HEAD_DIM)
    tl.store(LSEb + offs_m, m_i + tl.log2(l_i), mask=mmask)


@triton.autotune(
    configs=configs(
        [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
         triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)],
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4)),
    key=["HEAD_DIM"])
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CU, scale_log2, T,
              stride_qt, stride_kt, stride_vt, stride_ot,
              HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
              TAIL_N: tl.constexpr, PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid: (query blocks of the longest sample, samples, heads). Query blocks come first so
    # that neighbouring programs share the same K / V in L2.
    start, L, head = _program_sample(CU)
    m0 = tl.program_id(0) * BLOCK_M
    if m0 < L:
        Qb = Q + start * stride_qt + head * HEAD_DIM
        Kb = K + start * stride_kt + head * HEAD_DIM
        Vb = V + start * stride_vt + head * HEAD_DIM
        Ob = O + start * stride_ot + head * HEAD_DIM
        LSEb = LSE + head * T + start
        if L - m0 > TAIL_N:
            _fwd_tile(Qb, Kb, Vb, Ob, LSEb, stride_qt, stride_kt, stride_vt, stride_ot, m0, L,
                      scale_log2, BLOCK_M, BLOCK_N, TAIL_N, HEAD_DIM, D0, D1, HAS_D1, PREC)
        else:
            _fwd_tile(Qb, Kb, Vb, Ob, LSEb, stride_qt, stride_kt, stride_vt, stride_ot, m0, L,
                      scale_log2, TAIL_N, BLOCK_N, TAIL_N, HEAD_DIM, D0, D1, HAS_D1, PREC)


# ---- backward ---------------------------------------------------------------------------------

@triton.jit
def _row_dot_kernel(O, DO, DELTA, T, stride_ot, stride_dt,
                    HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[h, t] = sum_d o[t, h, d] * do[t, h, d]: the softmax-gradient correction term."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    tmask = offs_t < T
    o = _load_rows(O + head * HEAD_DIM, stride_ot, offs_t, tmask, 0, DP, HEAD_DIM)
    do = _load_rows(DO + head * HEAD_DIM, stride_dt, offs_t, tmask, 0, DP, HEAD_DIM)
    tl.store(DELTA + head * T + offs_t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=tmask)


@triton.jit
def _dkdv_step(k0, k1, v0, v1, dk0, dk1, dv0, dv1, Qb, DOb, LSEb, DELTAb, stride_qt, stride_dt,
               m0, L, scale_log2, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
               D1: tl.constexpr, HAS_D1: tl.constexpr, PREC: tl.constexpr):
    """A block of ROWS queries adds its share to dK, dV of the program's keys. Works on the
    transposed scores (keys x queries) so dK and dV come out row-major."""
    offs_m = m0 + tl.arange(0, ROWS)
    mmask = offs_m < L
    qT0 = _load_cols(Qb, stride_qt, offs_m, mmask, 0, D0, HEAD_DIM)
    do0 = _load_rows(DOb, stride_dt, offs_m, mmask, 0, D0, HEAD_DIM)
    # Rows past the sample get lse = +inf, hence p = 0: they add nothing.
    lse = tl.load(LSEb + offs_m, mask=mmask, other=float("inf"))
    delta = tl.load(DELTAb + offs_m, mask=mmask, other=0.0)
    sT = tl.dot(k0, qT0, input_precision=PREC)
    if HAS_D1:
        qT1 = _load_cols(Qb, stride_qt, offs_m, mmask, D0, D1, HEAD_DIM)
        do1 = _load_rows(DOb, stride_dt, offs_m, mmask, D0, D1, HEAD_DIM)
        sT = tl.dot(k1, qT1, sT, input_precision=PREC)
    pT = tl.exp2(sT * scale_log2 - lse[None, :])
    dv0 = tl.dot(pT.to(do0.dtype), do0, dv0, input_precision=PREC)
    dpT = tl.dot(v0, tl.trans(do0), input_precision=PREC)
    if HAS_D1:
        dv1 = tl.dot(pT.to(do1.dtype), do1, dv1, input_precision=PREC)
        dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=PREC)
    dsT = (pT * (dpT - delta[None, :])).to(qT0.dtype)
    dk0 = tl.dot(dsT, tl.trans(qT0), dk0, input_precision=PREC)
    if HAS_D1:
        dk1 = tl.dot(dsT, tl.trans(qT1), dk1, input_precision=PREC)
    return dk0, dk1, dv0, dv1


@triton.jit
def _dkdv_tile(Qb, Kb, Vb, DOb, DKb, DVb, LSEb, DELTAb, stride_qt, stride_kt, stride_vt, stride_dt,
               stride_dkt, stride_dvt, n0, L, scale_log2, scale,
               COLS: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr,
               HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
               PREC: tl.constexpr):
    offs_n = n0 + tl.arange(0, COLS)
    nmask = offs_n < L
    k0 = _load_rows(Kb, stride_kt, offs_n, nmask, 0, D0, HEAD_DIM)
    v0 = _load_rows(Vb, stride_vt, offs_n, nmask, 0, D0, HEAD_DIM)
    k1 = k0
    v1 = v0
    if HAS_D1:
        k1 = _load_rows(Kb, stride_kt, offs_n, nmask, D0, D1, HEAD_DIM)
        v1 = _load_rows(Vb, stride_vt, offs_n, nmask, D0, D1, HEAD_DIM)
    dk0 = tl.zeros([COLS, D0], tl.float32)
    dv0 = tl.zeros([COLS, D0], tl.float32)
    dk1 = tl.zeros([COLS, D1], tl.float32)
    dv1 = tl.zeros([COLS, D1], tl.float32)
    m_full = L // BLOCK_M
    for i in range(0, m_full):
        dk0, dk1, dv0, dv1 = _dkdv_step(k0, k1, v0, v1, dk0, dk1, dv0, dv1, Qb, DOb, LSEb, DELTAb,
                                        stride_qt, stride_dt, i * BLOCK_M, L, scale_log2,
                                        BLOCK_M, HEAD_DIM, D0, D1, HAS_D1, PREC)
    rest = L - m_full * BLOCK_M
    if rest > TAIL_M:
        dk0, dk1, dv0, dv1 = _dkdv_step(k0, k1, v0, v1, dk0, dk1, dv0, dv1, Qb, DOb, LSEb, DELTAb,
                                        stride_qt, stride_dt, m_full * BLOCK_M, L, scale_log2,
                                        BLOCK_M, HEAD_DIM, D0, D1, HAS_D1, PREC)
    elif rest > 0:
        dk0, dk1, dv0, dv1 = _dkdv_step(k0, k1, v0, v1, dk0, dk1, dv0, dv1, Qb, DOb, LSEb, DELTAb,
                                        stride_qt, stride_dt, m_full * BLOCK_M, L, scale_log2,
                                        TAIL_M, HEAD_DIM, D0, D1, HAS_D1, PREC)
    _store_rows(DKb, stride_dkt, offs_n, nmask, 0, dk0 * scale, D0, HEAD_DIM)
    _store_rows(DVb, stride_dvt, offs_n, nmask, 0, dv0, D0, HEAD_DIM)
    if HAS_D1:
        _store_rows(DKb, stride_dkt, offs_n, nmask, D0, dk1 * scale, D1, HEAD_DIM)
        _store_rows(DVb, stride_dvt, offs_n, nmask, D0, dv1, D1, HEAD_DIM)


@triton.autotune(
    configs=configs(
        [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
         triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)],
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4)),
    key=["HEAD_DIM"])
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, CU, scale_log2, scale, T,
                   stride_qt, stride_kt, stride_vt, stride_dt, stride_dkt, stride_dvt,
                   HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                   HAS_D1: tl.constexpr, TAIL_N: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid: (key blocks of the longest sample, samples, heads); each program owns BLOCK_N keys
    # (or a TAIL_N tile for the last few) and sweeps every query of its sample.
    start, L, head = _program_sample(CU)
    n0 = tl.program_id(0) * BLOCK_N
    if n0 < L:
        Qb, Kb, Vb, DOb, LSEb, DELTAb = _backward_inputs(
            Q, K, V, DO, LSE, DELTA, start, head, T, stride_qt, stride_kt, stride_vt, stride_dt,
            HEAD_DIM)
        DKb = DK + start * stride_dkt + head * HEAD_DIM
        DVb = DV + start * stride_dvt + head * HEAD_DIM
        if L - n0 > TAIL_N:
            _dkdv_tile(Qb, Kb, Vb, DOb, DKb, DVb, LSEb, DELTAb, stride_qt, stride_kt, stride_vt,
                       stride_dt, stride_dkt, stride_dvt, n0, L, scale_log2, scale,
                       BLOCK_N, BLOCK_M, TAIL_N, HEAD_DIM, D0, D1, HAS_D1, PREC)
        else:
            _dkdv_tile(Qb, Kb, Vb, DOb, DKb, DVb, LSEb, DELTAb, stride_qt, stride_kt, stride_vt,
                       stride_dt, stride_dkt, stride_dvt, n0, L, scale_log2, scale,
                       TAIL_N, BLOCK_M, TAIL_N, HEAD_DIM, D0, D1, HAS_D1, PREC)


@triton.jit
def _dq_step(q0, q1, do0, do1, lse, delta, dq0, dq1, Kb, Vb, stride_kt, stride_vt, n0, L,
             scale_log2, COLS: tl.constexpr, MASK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr, PREC: tl.constexpr):
    offs_n = n0 + tl.arange(0, COLS)
    nmask = offs_n < L
    kT0 = _load_cols(Kb, stride_kt, offs_n, nmask, 0, D0, HEAD_DIM)
    vT0 = _load_cols(Vb, stride_vt, offs_n, nmask, 0, D0, HEAD_DIM)
    s = tl.dot(q0, kT0, input_precision=PREC)
    dp = tl.dot(do0, vT0, input_precision=PREC)
    if HAS_D1:
        kT1 = _load_cols(Kb, stride_kt, offs_n, nmask, D0, D1, HEAD_DIM)
        vT1 = _load_cols(Vb, stride_vt, offs_n, nmask, D0, D1, HEAD_DIM)
        s = tl.dot(q1, kT1, s, input_precision=PREC)
        dp = tl.dot(do1, vT1, dp, input_precision=PREC)
    p = tl.exp2(s * scale_log2 - lse[:, None])
    if MASK_N:
        p = tl.where(nmask[None, :], p, 0.0)
    ds = (p * (dp - delta[:, None])).to(kT0.dtype)
    dq0 = tl.dot(ds, tl.trans(kT0), dq0, input_precision=PREC)
    if HAS_D1:
        dq1 = tl.dot(ds, tl.trans(kT1), dq1, input_precision=PREC)
    return dq0, dq1


@triton.jit
def _dq_tile(Qb, Kb, Vb, DOb, DQb, LSEb, DELTAb, stride_qt, stride_kt, stride_vt, stride_dt,
             stride_dqt, m0, L, scale_log2, scale,
             ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
             HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
             PREC: tl.constexpr):
    offs_m = m0 + tl.arange(0, ROWS)
    mmask = offs_m < L
    q0 = _load_rows(Qb, stride_qt, offs_m, mmask, 0, D0, HEAD_DIM)
    do0 = _load_rows(DOb, stride_dt, offs_m, mmask, 0, D0, HEAD_DIM)
    q1 = q0
    do1 = do0
    if HAS_D1:
        q1 = _load_rows(Qb, stride_qt, offs_m, mmask, D0, D1, HEAD_DIM)
        do1 = _load_rows(DOb, stride_dt, offs_m, mmask, D0, D1, HEAD_DIM)
    lse = tl.load(LSEb + offs_m, mask=mmask, other=0.0)
    delta = tl.load(DELTAb + offs_m, mask=mmask, other=0.0)
    dq0 = tl.zeros([ROWS, D0], tl.float32)
    dq1 = tl.zeros([ROWS, D1], tl.float32)
    n_full = L // BLOCK_N
    for j in range(0, n_full):
        dq0, dq1 = _dq_step(q0, q1, do0, do1, lse, delta, dq0, dq1, Kb, Vb, stride_kt, stride_vt,
                            j * BLOCK_N, L, scale_log2, BLOCK_N, False, HEAD_DIM, D0, D1, HAS_D1,
                            PREC)
    rest = L - n_full * BLOCK_N
    if rest > TAIL_N:
        dq0, dq1 = _dq_step(q0, q1, do0, do1, lse, delta, dq0, dq1, Kb, Vb, stride_kt, stride_vt,
                            n_full * BLOCK_N, L, scale_log2, BLOCK_N, True, HEAD_DIM, D0, D1,
                            HAS_D1, PREC)
    elif rest > 0:
        dq0, dq1 = _dq_step(q0, q1, do0, do1, lse, delta, dq0, dq1, Kb, Vb, stride_kt, stride_vt,
                            n_full * BLOCK_N, L, scale_log2, TAIL_N, True, HEAD_DIM, D0, D1,
                            HAS_D1, PREC)
    _store_rows(DQb, stride_dqt, offs_m, mmask, 0, dq0 * scale, D0, HEAD_DIM)
    if HAS_D1:
        _store_rows(DQb, stride_dqt, offs_m, mmask, D0, dq1 * scale, D1, HEAD_DIM)


@triton.autotune(
    configs=configs(
        [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
         triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)],
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4)),
    key=["HEAD_DIM"])
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, CU, scale_log2, scale, T,
                 stride_qt, stride_kt, stride_vt, stride_dt, stride_dqt,
                 HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                 HAS_D1: tl.constexpr, TAIL_N: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start, L, head = _program_sample(CU)
    m0 = tl.program_id(0) * BLOCK_M
    if m0 < L:
        Qb, Kb, Vb, DOb, LSEb, DELTAb = _backward_inputs(
            Q, K, V, DO, LSE, DELTA, start, head, T, stride_qt, stride_kt, stride_vt, stride_dt,
            HEAD_DIM)
        DQb = DQ + start * stride_dqt + head * HEAD_DIM
        if L - m0 > TAIL_N:
            _dq_tile(Qb, Kb, Vb, DOb, DQb, LSEb, DELTAb, stride_qt, stride_kt, stride_vt, stride_dt,
                     stride_dqt, m0, L, scale_log2, scale, BLOCK_M, BLOCK_N, TAIL_N,
                     HEAD_DIM, D0, D1, HAS_D1, PREC)
        else:
            _dq_tile(Qb, Kb, Vb, DOb, DQb, LSEb, DELTAb, stride_qt, stride_kt, stride_vt, stride_dt,
                     stride_dqt, m0, L, scale_log2, scale, TAIL_N, BLOCK_N, TAIL_N,
                     HEAD_DIM, D0, D1, HAS_D1, PREC)


# ---- host side --------------------------------------------------------------------------------

def _head_args(D: int, dtype: torch.dtype) -> dict:
    d0, d1 = head_dim_chunks(D)
    return dict(HEAD_DIM=D, D0=d0, D1=max(d1, 16), HAS_D1=d1 > 0, TAIL_N=TAIL,
                PREC=dot_precision(dtype))


def _token_rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any token stride but need each token's heads side by side
    (head h at column h * D): the head offset is then the compile-time HEAD_DIM, so the compiler
    can prove 16-byte alignment (88 = 8 x 11) and vectorise loads, which a runtime head stride
    of 88 (not a multiple of 16) would prevent. q/k/v sliced from a fused [T, 3, H, D] qualify."""
    D = t.shape[-1]
    return t if t.stride(-1) == 1 and t.stride(-2) == D else t.contiguous()


def _forward(q, k, v, cu, max_seqlen: int, scale: float):
    T, H, D = q.shape
    S = cu.shape[0] - 1
    o = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(H, T, dtype=torch.float32, device=q.device)
    if T == 0 or S == 0:
        return o, lse
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), S, H)  # noqa: E731
    _attn_fwd[grid](q, k, v, o, lse, cu, scale * LOG2E, T,
                    q.stride(0), k.stride(0), v.stride(0), o.stride(0), **_head_args(D, q.dtype))
    return o, lse


def _backward(q, k, v, o, lse, do, cu, max_seqlen: int, scale: float):
    T, H, D = q.shape
    S = cu.shape[0] - 1
    dq, dk, dv = (torch.empty(T, H, D, dtype=q.dtype, device=q.device) for _ in range(3))
    if T == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(H, T, dtype=torch.float32, device=q.device)
    block_t = 64
    _row_dot_kernel[(triton.cdiv(T, block_t), H)](
        o, do, delta, T, o.stride(0), do.stride(0),
        HEAD_DIM=D, DP=triton.next_power_of_2(D), BLOCK_T=block_t)
    args = _head_args(D, q.dtype)
    strides = (q.stride(0), k.stride(0), v.stride(0), do.stride(0))
    grid_n = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]), S, H)  # noqa: E731
    _attn_bwd_dkdv[grid_n](q, k, v, do, dk, dv, lse, delta, cu, scale * LOG2E, scale, T, *strides,
                           dk.stride(0), dv.stride(0), **args)
    grid_m = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), S, H)  # noqa: E731
    _attn_bwd_dq[grid_m](q, k, v, do, dq, lse, delta, cu, scale * LOG2E, scale, T, *strides,
                         dq.stride(0), **args)
    return dq, dk, dv


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, max_seqlen, scale):
        q, k, v = (_token_rows(t) for t in (q, k, v))
        o, lse = _forward(q, k, v, cu, max_seqlen, scale)
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, _token_rows(do), cu, ctx.max_seqlen, ctx.scale)
        return dq, dk, dv, None, None, None


def _check(q, k, v, cu_seqlens, max_seqlen) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [tokens, heads, head_dim] shape; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor, got {cu_seqlens.dtype} "
                         f"of shape {tuple(cu_seqlens.shape)}")
    if int(max_seqlen) < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if not cu_seqlens.is_cuda and cu_seqlens.numel():
        # Cheap on the host; on a GPU it would cost a synchronisation, so it is skipped there.
        # Tokens past max_seqlen in a sample would silently get no output.
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0] or (lens.numel() and int(lens.min()) < 0):
            raise ValueError(f"cu_seqlens must rise from 0 to the {q.shape[0]} tokens, got "
                             f"{cu_seqlens.tolist()[:8]}{'...' if cu_seqlens.numel() > 8 else ''}")
        if lens.numel() and int(lens.max()) > int(max_seqlen):
            raise ValueError(f"a sample has {int(lens.max())} tokens but max_seqlen is {max_seqlen}")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: Optional[float] = None) -> torch.Tensor:
    """q, k, v: [T, H, D] packed; cu_seqlens: [S+1] int, cu_seqlens[-1] == T; max_seqlen: the
    longest sample (host int). Returns [T, H, D] in q's dtype."""
    _check(q, k, v, cu_seqlens, max_seqlen)
    problem = unsupported(q, k, v)
    if problem:
        raise ValueError(f"varlen_attention (Triton): {problem}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _VarlenAttention.apply(q, k, v, cu_seqlens, int(max_seqlen), scale)


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_rest) -> Optional[str]:
    """Why the kernel cannot take these inputs, or None."""
    problem = device_problem(q, k, v) or dtype_problem(q, k, v)
    if problem:
        return problem
    if q.dim() != 3:
        return f"q has shape {tuple(q.shape)}; expected [tokens, heads, head_dim]"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} is above the supported {MAX_HEAD_DIM}"
    return None


def why_unsupported(fn: str, *tensors: torch.Tensor) -> Optional[str]:
    """The dispatch protocol: why `fn` cannot run here on these tensors, or None."""
    if fn != "varlen_attention":
        return f"{fn} is not implemented in this module"
    return unsupported(*tensors)


def supports(fn: str, *tensors: torch.Tensor) -> bool:
    return why_unsupported(fn, *tensors) is None
