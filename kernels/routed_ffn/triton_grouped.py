"""Grouped GEMM and grouped LayerNorm for the modality-routed FFN, in Triton.

    grouped_linear(x, counts, weights, biases, activation)    rows of group e: act(x_e W_e^T + b_e)
    grouped_layer_norm(x, counts, weights, biases, eps)       rows of group e: LN with (w_e, b_e)

Rows arrive sorted by expert (counts[e] rows for expert e, host ints; at most three experts:
vision, language, vision-language). Each GEMM is one launch over all groups: the row tiles of
every group are laid end to end, a tile finds its expert from its index and picks that expert's
weight pointer, so tiles never straddle two experts and no expert waits for another's launch.
Bias and exact (erf) GELU are applied in the epilogue, on the fp32 accumulator.

Backward: dZ = dY * GELU'(Z) (one elementwise pass over the saved pre-activation; fusing it
into the GEMMs would put an erf and an exp per element into the tensor-core main loop), then
dX with the same grouped kernel (B = W_e instead of W_e^T), and dW_e = dZ_e^T X_e with the bias
gradient summed in the same pass. An expert with no rows gets zero dW and db: ZeRO expects a
gradient for every parameter on every step.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from kernels.layernorm import triton_layernorm
from kernels.triton_support import configs, device_problem, dot_precision, dtype_problem, pick3

MAX_GROUPS = 3
ACTIVATIONS = (None, "gelu")


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.autotune(
    configs=configs(
        # 128 x 128 first: no register spills with the GELU epilogue (megatron_style.benchmarks.compile_report);
        # 128 x 256 spills ~250 bytes there but may still win on fc2 and dX.
        [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
         triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
         triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4)],
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 2}, num_warps=4)),
    # fc2's forward and fc1's dX share (N_OUT, K) but not the weight layout: W_T is in the key.
    key=["N_OUT", "K", "W_T", "GELU"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["c0", "c1", "c2"])
def _grouped_mm(A, B0, B1, B2, BIAS0, BIAS1, BIAS2, C, Z, c0, c1, c2, N_OUT, K,
                stride_am, stride_w, stride_cm,
                W_T: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    """C[rows of e] = act(A[rows of e] @ B_e + bias_e), B_e = W_e^T (W_T, W_e is [N_OUT, K]: the
    forward) or W_e ([K, N_OUT]: dX). The unit stride is a compile-time fact either way, so the
    B loads vectorise and pipeline whatever Triton's integer specialisation decides."""
    pid = tl.program_id(0)
    t1 = tl.cdiv(c0, BLOCK_M)
    t2 = t1 + tl.cdiv(c1, BLOCK_M)
    tiles_m = t2 + tl.cdiv(c2, BLOCK_M)
    tiles_n = tl.cdiv(N_OUT, BLOCK_N)
    # GROUP_M row tiles sweep the columns together, so their A rows and the B columns they
    # share stay in L2.
    width = GROUP_M * tiles_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % width) % group_rows
    tile_n = (pid % width) // group_rows

    e = (tile_m >= t1).to(tl.int32) + (tile_m >= t2).to(tl.int32)
    first_tile = tl.where(e == 0, 0, tl.where(e == 1, t1, t2))
    row_start = tl.where(e == 0, 0, tl.where(e == 1, c0, c0 + c1))
    row_end = tl.where(e == 0, c0, tl.where(e == 1, c0 + c1, c0 + c1 + c2))
    row0 = row_start + (tile_m - first_tile) * BLOCK_M
    # 64-bit offsets only in the scalar tile base; within a tile 32 bits suffice and keep the
    # pointer tiles small in registers.
    r = tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    B = pick3(e, B0, B1, B2)
    # Rows past the group's end belong to the next group: reading them is harmless (their
    # results are not stored), so A's loads are masked only at the end of the tensor.
    a_ptrs = A + row0.to(tl.int64) * stride_am + (r[:, None] * stride_am + ks[None, :])
    if W_T:
        b_ptrs = B + ks[:, None] + cols[None, :] * stride_w
        b_step = BLOCK_K
    else:
        b_ptrs = B + ks[:, None] * stride_w + cols[None, :]
        b_step = BLOCK_K * stride_w
    a_rows = r[:, None] < c0 + c1 + c2 - row0
    b_cols = cols[None, :] < N_OUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=a_rows, other=0.0)
            b = tl.load(b_ptrs, mask=b_cols, other=0.0)
        else:
            a = tl.load(a_ptrs, mask=a_rows & (ks[None, :] < K - k0), other=0.0)
            b = tl.load(b_ptrs, mask=b_cols & (ks[:, None] < K - k0), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        b_ptrs += b_step
    if HAS_BIAS:
        bias = tl.load(pick3(e, BIAS0, BIAS1, BIAS2) + cols, mask=cols < N_OUT, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    base = row0.to(tl.int64) * stride_cm
    out = r[:, None] * stride_cm + cols[None, :]
    smask = (r[:, None] < row_end - row0) & b_cols
    if GELU:
        tl.store(Z + base + out, acc.to(Z.dtype.element_ty), mask=smask)
        acc = _gelu(acc)
    tl.store(C + base + out, acc.to(C.dtype.element_ty), mask=smask)


@triton.autotune(
    configs=configs(
        [triton.Config({"BLOCK_O": 128, "BLOCK_K": 256, "BLOCK_R": 64}, num_warps=8, num_stages=3),
         triton.Config({"BLOCK_O": 128, "BLOCK_K": 128, "BLOCK_R": 64}, num_warps=8, num_stages=4),
         triton.Config({"BLOCK_O": 64, "BLOCK_K": 128, "BLOCK_R": 64}, num_warps=4, num_stages=4)],
        triton.Config({"BLOCK_O": 64, "BLOCK_K": 64, "BLOCK_R": 32}, num_warps=4)),
    key=["N_OUT", "K"])
@triton.jit(do_not_specialize=["c0", "c1", "c2"])
def _grouped_wgrad(DZ, X, DW0, DW1, DW2, DB0, DB1, DB2, c0, c1, c2, N_OUT, K, stride_dzm, stride_xm,
                   HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """dW_e = dZ_e^T X_e ([N_OUT, K]) and db_e = column sums of dZ_e; grid (tiles, groups).
    A group with no rows runs no iterations and stores zeros."""
    e = tl.program_id(1)
    tiles_k = tl.cdiv(K, BLOCK_K)
    tile_o = tl.program_id(0) // tiles_k
    tile_k = tl.program_id(0) % tiles_k
    row_start = tl.where(e == 0, 0, tl.where(e == 1, c0, c0 + c1))
    row_end = tl.where(e == 0, c0, tl.where(e == 1, c0 + c1, c0 + c1 + c2))
    os_ = tile_o * BLOCK_O + tl.arange(0, BLOCK_O)
    ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    omask = os_ < N_OUT
    kmask = ks < K
    acc = tl.zeros([BLOCK_O, BLOCK_K], tl.float32)
    db = tl.zeros([BLOCK_O], tl.float32)
    r = tl.arange(0, BLOCK_R)
    start = row_start.to(tl.int64)
    dz_ptrs = DZ + start * stride_dzm + (r[None, :] * stride_dzm + os_[:, None])
    x_ptrs = X + start * stride_xm + (r[:, None] * stride_xm + ks[None, :])
    for r0 in range(row_start, row_end, BLOCK_R):
        left = row_end - r0
        dzT = tl.load(dz_ptrs, mask=(r[None, :] < left) & omask[:, None], other=0.0)
        x = tl.load(x_ptrs, mask=(r[:, None] < left) & kmask[None, :], other=0.0)
        acc = tl.dot(dzT, x, acc, input_precision=PREC)
        if HAS_BIAS:
            if tile_k == 0:
                db += tl.sum(dzT.to(tl.float32), 1)
        dz_ptrs += BLOCK_R * stride_dzm
        x_ptrs += BLOCK_R * stride_xm
    DW = pick3(e, DW0, DW1, DW2)
    tl.store(DW + os_[:, None] * K + ks[None, :], acc.to(DW.dtype.element_ty),
             mask=omask[:, None] & kmask[None, :])
    if HAS_BIAS:
        if tile_k == 0:
            DB = pick3(e, DB0, DB1, DB2)
            tl.store(DB + os_, db.to(DB.dtype.element_ty), mask=omask)


@triton.jit
def _gelu_grad(DY, Z, DZ, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
    # d/dz [z Phi(z)] = Phi(z) + z phi(z)
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    tl.store(DZ + offs, (dy * (cdf + z * pdf)).to(DZ.dtype.element_ty), mask=mask)


# ---- host side --------------------------------------------------------------------------------

def _three(ps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return list(ps) + [ps[0]] * (MAX_GROUPS - len(ps))


def _counts3(counts: Sequence[int]) -> list[int]:
    return list(counts) + [0] * (MAX_GROUPS - len(counts))


def _mm(a: torch.Tensor, counts, ws: Sequence[torch.Tensor], transpose: bool,
        biases: Optional[Sequence[torch.Tensor]], gelu: bool):
    """Grouped a @ W_e^T (transpose) or a @ W_e, + bias_e, GELU. Returns (out, pre-activation
    or None). W_e must be contiguous."""
    n_out = ws[0].shape[0] if transpose else ws[0].shape[1]
    M, K = a.shape
    c = torch.empty(M, n_out, dtype=a.dtype, device=a.device)
    z = torch.empty_like(c) if gelu else None
    if M == 0 or n_out == 0:
        return c, z
    c3 = _counts3(counts)

    def grid(meta):
        bm = meta["BLOCK_M"]
        tiles_m = sum(triton.cdiv(n, bm) for n in c3)
        return (tiles_m * triton.cdiv(n_out, meta["BLOCK_N"]),)

    bias3 = _three(biases) if biases is not None else [c] * MAX_GROUPS
    _grouped_mm[grid](a, *_three(ws), *bias3, c, z if gelu else c, *c3, n_out, K,
                      a.stride(0), ws[0].stride(0), c.stride(0), W_T=transpose, HAS_BIAS=biases is not None, GELU=gelu, PREC=dot_precision(a.dtype))
    return c, z


def _wgrad(dz: torch.Tensor, x: torch.Tensor, counts, weights, with_bias: bool):
    n_out, K = weights[0].shape
    dws = [torch.empty_like(w) for w in weights]
    dbs = [torch.empty(n_out, dtype=w.dtype, device=w.device) for w in weights] if with_bias else None
    grid = lambda meta: (triton.cdiv(n_out, meta["BLOCK_O"]) * triton.cdiv(K, meta["BLOCK_K"]),  # noqa: E731
                         len(weights))
    _grouped_wgrad[grid](dz, x, *_three(dws), *_three(dbs if with_bias else dws), *_counts3(counts),
                         n_out, K, dz.stride(0), x.stride(0),
                         HAS_BIAS=with_bias, PREC=dot_precision(x.dtype))
    return dws, dbs


def _gelu_backward(dy: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    dz = torch.empty_like(z)
    n = z.numel()
    if n:
        block = 1024
        _gelu_grad[(triton.cdiv(n, block),)](dy, z, dz, n, BLOCK=block)
    return dz


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, gelu, has_bias, *params):
        G = len(counts)
        ws = params[:G]
        bs = params[G:] if has_bias else None
        y, z = _mm(x, counts, ws, True, bs, gelu)
        ctx.save_for_backward(x, z, *ws)
        ctx.counts, ctx.gelu, ctx.has_bias = counts, gelu, has_bias
        return y

    @staticmethod
    def backward(ctx, dy):
        x, z, *ws = ctx.saved_tensors
        dy = dy.contiguous()
        dz = _gelu_backward(dy, z) if ctx.gelu else dy
        dx = None
        if ctx.needs_input_grad[0]:
            dx, _ = _mm(dz, ctx.counts, ws, False, None, False)  # dX_e = dZ_e W_e
        if not any(ctx.needs_input_grad[4:]):  # frozen experts
            return (dx, None, None, None) + (None,) * (len(ws) * (2 if ctx.has_bias else 1))
        dws, dbs = _wgrad(dz, x, ctx.counts, ws, ctx.has_bias)
        return (dx, None, None, None, *dws, *(dbs or ()))


def _check(x, counts, weights, biases, activation) -> list[int]:
    counts = [int(c) for c in counts]
    if not 1 <= len(counts) <= MAX_GROUPS:
        raise ValueError(f"grouped ops take 1..{MAX_GROUPS} groups (experts), got {len(counts)}")
    if len(weights) != len(counts) or len(biases) != len(counts):
        raise ValueError(f"{len(counts)} groups need {len(counts)} weights and biases; got "
                         f"{len(weights)} weights, {len(biases)} biases")
    if x.dim() != 2:
        raise ValueError(f"x must be [rows, features], got shape {tuple(x.shape)}")
    if min(counts) < 0 or sum(counts) != x.shape[0]:
        raise ValueError(f"group counts {counts} must be >= 0 and sum to the {x.shape[0]} rows of x")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
    shape = tuple(weights[0].shape)
    if len(shape) != 2 or shape[1] != x.shape[1] or any(tuple(w.shape) != shape for w in weights):
        raise ValueError(f"expert weights must all be [out, {x.shape[1]}]; got "
                         f"{[tuple(w.shape) for w in weights]}")
    has = [b is not None for b in biases]
    if any(has) and not all(has):
        raise ValueError("biases must be given for every expert or for none")
    if all(has) and any(tuple(b.shape) != (shape[0],) for b in biases):
        raise ValueError(f"expert biases must all be [{shape[0]}]; got {[tuple(b.shape) for b in biases]}")
    return counts


def grouped_linear(x: torch.Tensor, counts: Sequence[int], weights: Sequence[torch.Tensor],
                   biases: Sequence[Optional[torch.Tensor]],
                   activation: Optional[str] = None) -> torch.Tensor:
    """Rows of group e: act(x_e @ W_e^T + b_e). activation: None or "gelu" (exact, erf)."""
    counts = _check(x, counts, weights, biases, activation)
    problem = unsupported(x, *weights, *biases)
    if problem:
        raise ValueError(f"grouped_linear (Triton): {problem}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weights = [w if w.is_contiguous() else w.contiguous() for w in weights]
    has_bias = biases[0] is not None
    params = list(weights) + (list(biases) if has_bias else [])
    return _GroupedLinear.apply(x, tuple(counts), activation == "gelu", has_bias, *params)


def grouped_layer_norm(x: torch.Tensor, counts: Sequence[int], weights: Sequence[torch.Tensor],
                       biases: Sequence[torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm of each group's rows with its own weight and bias (one launch)."""
    return triton_layernorm.grouped_norm(x, counts, weights, biases, eps)


def unsupported(x: torch.Tensor, *params) -> Optional[str]:
    """Why grouped_linear cannot take these inputs, or None."""
    params = [p for p in params if p is not None]
    return device_problem(x, *params) or dtype_problem(x, *params)


def why_unsupported(fn: str, *args) -> Optional[str]:
    """The dispatch protocol: why `fn` cannot run here on these tensors, or None.
    grouped_linear(x, *weights, *biases); grouped_layer_norm(x, *weights, *biases)."""
    if fn == "grouped_linear":
        return unsupported(*args)
    if fn == "grouped_layer_norm":
        return triton_layernorm.unsupported(args[0], None, *args[1:])
    return f"{fn} is not implemented in this module"


def supports(fn: str, *tensors: torch.Tensor) -> bool:
    return why_unsupported(fn, *tensors) is None
