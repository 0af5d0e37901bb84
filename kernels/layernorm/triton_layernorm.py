"""LayerNorm in Triton: plain, with a fused residual add, and per expert group.

    layer_norm(x, w, b, eps)                      -> LN(x)
    add_layer_norm(x, residual, w, b, eps)        -> (LN(x + residual), x + residual)
    grouped_norm(x, counts, ws, bs, eps)          -> rows of group e normalised with (ws[e], bs[e])

One kernel pair serves all three. Rows are cut into chunks that never cross a group boundary,
so a program loads its group's weight and bias once and, in the backward, sums its rows' share
of dW and dB in registers; the host adds the per-chunk partial sums of each group (an empty
group has no chunks and gets a zero gradient, as ZeRO expects one for every parameter).

Statistics and arithmetic are fp32 whatever the input dtype; weight and bias may be fp32 with
half inputs (the output takes x's dtype, the gradients take the parameters' dtypes).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from kernels.triton_support import device_problem, dtype_problem, pick3

MAX_GROUPS = 3
MAX_DIM = 16384  # one row is one register tile; wider rows would spill


@triton.jit
def _group_of_chunk(chunk, t1, t2, r1, r2, N, ROWS_PER_CHUNK: tl.constexpr):
    """Group e of a chunk and the rows [start, end) it covers. t1, t2: first chunk of groups 1
    and 2; r1, r2: first row of groups 1 and 2; N: rows in all."""
    e = (chunk >= t1).to(tl.int32) + (chunk >= t2).to(tl.int32)
    first_chunk = tl.where(e == 0, 0, tl.where(e == 1, t1, t2))
    group_start = tl.where(e == 0, 0, tl.where(e == 1, r1, r2))
    group_end = tl.where(e == 0, r1, tl.where(e == 1, r2, N))
    start = group_start + (chunk - first_chunk) * ROWS_PER_CHUNK
    end = tl.minimum(start + ROWS_PER_CHUNK, group_end)
    return e, start, end


@triton.jit
def _ln_fwd(X, R, S, Y, W0, W1, W2, B0, B1, B2, MEAN, RSTD, N, D, t1, t2, r1, r2, eps,
            stride_x, stride_r, stride_s, stride_y,
            HAS_RES: tl.constexpr, ROWS_PER_CHUNK: tl.constexpr, BLOCK_R: tl.constexpr,
            BLOCK_D: tl.constexpr):
    e, start, end = _group_of_chunk(tl.program_id(0), t1, t2, r1, r2, N, ROWS_PER_CHUNK)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(pick3(e, W0, W1, W2) + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(pick3(e, B0, B1, B2) + cols, mask=cmask, other=0.0).to(tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < end
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        if HAS_RES:
            x = x + tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
            # The sum is rounded to the input dtype, as `x + residual` would be: the residual
            # stream and the normalised values both derive from that rounded sum.
            tl.store(S + rows64[:, None] * stride_s + cols[None, :], x, mask=mask)
        x = x.to(tl.float32)
        mean = tl.sum(x, 1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
        y = xc * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd(S, DY, DS, DX, DR, W0, W1, W2, MEAN, RSTD, DW_PART, DB_PART, N, D, t1, t2, r1, r2,
            stride_s, stride_dy, stride_ds, stride_dx, stride_dr,
            HAS_DS: tl.constexpr, HAS_DR: tl.constexpr, ROWS_PER_CHUNK: tl.constexpr, BLOCK_R: tl.constexpr,
            BLOCK_D: tl.constexpr):
    chunk = tl.program_id(0)
    e, start, end = _group_of_chunk(chunk, t1, t2, r1, r2, N, ROWS_PER_CHUNK)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(pick3(e, W0, W1, W2) + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_D], tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < end
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(S + rows64[:, None] * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, 1) / D
        c2 = tl.sum(wdy, 1) / D
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            # add_layer_norm: the sum x + residual also flows on unnormalised; its gradient
            # joins here so dx = dresidual comes out in one pass.
            dx += tl.load(DS + rows64[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DR:
            # The residual's gradient equals dx, but autograd must get two tensors: a leaf's
            # .grad may take over the returned storage and later be accumulated in place.
            tl.store(DR + rows64[:, None] * stride_dr + cols[None, :], dx.to(DR.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, 0)
        db += tl.sum(dy, 0)
    tl.store(DW_PART + chunk * D + cols, dw, mask=cmask)
    tl.store(DB_PART + chunk * D + cols, db, mask=cmask)


# ---- host side --------------------------------------------------------------------------------

class _Plan:
    """How rows are cut into chunks: ROWS_PER_CHUNK rows (a multiple of BLOCK_R, the rows one
    loop step holds), chunk boundaries of each group, tile width and warps."""

    def __init__(self, counts: Sequence[int], D: int, device: torch.device):
        self.block_d = triton.next_power_of_2(D)
        # A register tile of ~4K fp32 values: several short rows per step, one long row.
        self.block_r = max(1, min(16, 4096 // self.block_d))
        self.num_warps = min(16, max(4, self.block_d * self.block_r // 512))
        N = sum(counts)
        self.N, self.D = N, D
        # About four chunks per SM keeps every SM busy and the partial-sum buffers small.
        programs = 4 * _sm_count(device)
        per = max(self.block_r, triton.cdiv(max(N, 1), programs))
        self.rows = triton.cdiv(per, self.block_r) * self.block_r
        chunks = [triton.cdiv(c, self.rows) for c in counts] + [0] * (MAX_GROUPS - len(counts))
        self.chunk_starts = [0, chunks[0], chunks[0] + chunks[1], sum(chunks)]
        rows = list(counts) + [0] * (MAX_GROUPS - len(counts))
        self.r1, self.r2 = rows[0], rows[0] + rows[1]

    @property
    def num_chunks(self) -> int:
        return self.chunk_starts[-1]

    def kernel_args(self) -> tuple:
        return (self.N, self.D, self.chunk_starts[1], self.chunk_starts[2], self.r1, self.r2)


_SM_COUNTS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: few programs, each looping over many rows
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNTS:
        _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNTS[idx]


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _three(ps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return list(ps) + [ps[0]] * (MAX_GROUPS - len(ps))


def _forward(x2, res2, counts, ws, bs, eps):
    N, D = x2.shape
    plan = _Plan(counts, D, x2.device)
    y = torch.empty_like(x2)
    s = torch.empty_like(x2) if res2 is not None else x2
    mean = torch.empty(N, dtype=torch.float32, device=x2.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x2.device)
    if plan.num_chunks:
        r = res2 if res2 is not None else x2
        _ln_fwd[(plan.num_chunks,)](
            x2, r, s, y, *_three(ws), *_three(bs), mean, rstd, *plan.kernel_args(), eps,
            x2.stride(0), r.stride(0), s.stride(0), y.stride(0),
            HAS_RES=res2 is not None, ROWS_PER_CHUNK=plan.rows, BLOCK_R=plan.block_r,
            BLOCK_D=plan.block_d, num_warps=plan.num_warps)
    return y, s, mean, rstd, plan


def _backward(s, dy, ds, ws, mean, rstd, plan, with_dr: bool):
    N, D = s.shape
    dx = torch.empty_like(s)
    dr = torch.empty_like(s) if with_dr else None
    parts = torch.empty(2, max(plan.num_chunks, 1), D, dtype=torch.float32, device=s.device)
    if plan.num_chunks:
        d_s = ds if ds is not None else dy
        _ln_bwd[(plan.num_chunks,)](
            s, dy, d_s, dx, dr if with_dr else dx, *_three(ws), mean, rstd, parts[0], parts[1],
            *plan.kernel_args(), s.stride(0), dy.stride(0), d_s.stride(0), dx.stride(0),
            dr.stride(0) if with_dr else 0, HAS_DS=ds is not None, HAS_DR=with_dr, ROWS_PER_CHUNK=plan.rows, BLOCK_R=plan.block_r,
            BLOCK_D=plan.block_d, num_warps=plan.num_warps)
    dws, dbs = [], []
    for e, w in enumerate(ws):
        lo, hi = plan.chunk_starts[e], plan.chunk_starts[e + 1]
        dws.append(parts[0, lo:hi].sum(0).to(w.dtype))
        dbs.append(parts[1, lo:hi].sum(0).to(w.dtype))
    return dx, dr, dws, dbs


class _LayerNorm(torch.autograd.Function):
    """x [N, D] (+ residual) -> y (, x + residual); params = (*weights, *biases)."""

    @staticmethod
    def forward(ctx, x, residual, counts, eps, *params):
        G = len(counts)
        ws, bs = params[:G], params[G:]
        y, s, mean, rstd, plan = _forward(x, residual, counts, ws, bs, eps)
        ctx.save_for_backward(s, mean, rstd, *ws)
        ctx.plan, ctx.has_res, ctx.G = plan, residual is not None, G
        if residual is None:
            return y
        return y, s

    @staticmethod
    def backward(ctx, dy, ds=None):
        s, mean, rstd, *ws = ctx.saved_tensors
        dy = _rows2d(dy)
        ds = _rows2d(ds) if ds is not None else None
        dx, dr, dws, dbs = _backward(s, dy, ds, ws, mean, rstd, ctx.plan,
                                     ctx.has_res and ctx.needs_input_grad[1])
        return (dx, dr, None, None, *dws, *dbs)


# ---- entry points -----------------------------------------------------------------------------

def _check_params(D: int, ws, bs) -> None:
    for name, ps in (("weight", ws), ("bias", bs)):
        for p in ps:
            if p is None:
                raise ValueError(f"LayerNorm {name} is None: the Triton LayerNorm needs an affine "
                                 f"weight and bias (use the reference for elementwise_affine=False)")
            if p.shape != (D,):
                raise ValueError(f"LayerNorm {name} has shape {tuple(p.shape)}; expected ({D},)")


def grouped_norm(x: torch.Tensor, counts: Sequence[int], weights: Sequence[torch.Tensor],
                 biases: Sequence[torch.Tensor], eps: float,
                 residual: Optional[torch.Tensor] = None):
    """The general entry: rows of x sorted by group (counts[e] rows for group e, host ints,
    at most three groups); returns LN(x [+ residual]) and, with a residual, also the sum."""
    counts = [int(c) for c in counts]
    if not 1 <= len(counts) <= MAX_GROUPS or len(weights) != len(counts) or len(biases) != len(counts):
        raise ValueError(f"need 1..{MAX_GROUPS} groups with one weight and bias each; got "
                         f"{len(counts)} counts, {len(weights)} weights, {len(biases)} biases")
    if min(counts) < 0 or sum(counts) != x.reshape(-1, x.shape[-1]).shape[0]:
        raise ValueError(f"group counts {counts} must be >= 0 and sum to the {x.numel() // x.shape[-1]} rows")
    D = x.shape[-1]
    _check_params(D, weights, biases)
    problem = unsupported(x, residual, *weights, *biases)
    if problem:
        raise ValueError(f"LayerNorm (Triton): {problem}")
    x2 = _rows2d(x)
    r2 = None
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}, x {tuple(x.shape)}")
        r2 = _rows2d(residual)
    out = _LayerNorm.apply(x2, r2, counts, float(eps), *weights, *biases)
    if residual is None:
        return out.view(x.shape)
    return out[0].view(x.shape), out[1].view(x.shape)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return grouped_norm(x, (x.numel() // max(x.shape[-1], 1),), [weight], [bias], eps)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (LayerNorm(x + residual), x + residual)."""
    return grouped_norm(x, (x.numel() // max(x.shape[-1], 1),), [weight], [bias], eps, residual)


def unsupported(x: torch.Tensor, residual: Optional[torch.Tensor], *params) -> Optional[str]:
    """Why the kernel cannot take these inputs, or None."""
    problem = device_problem(x, residual, *params) or dtype_problem(x, residual)
    if problem:
        return problem
    if any(p is None for p in params):
        return "the Triton LayerNorm needs an affine weight and bias (got None)"
    if any(dtype_problem(p) for p in params):
        return "LayerNorm parameters must be float16, bfloat16 or float32"
    if x.dim() < 1 or x.shape[-1] > MAX_DIM or x.shape[-1] < 1:
        return f"normalised dim {x.shape[-1] if x.dim() else None} is outside 1..{MAX_DIM}"
    return None


def why_unsupported(fn: str, *args) -> Optional[str]:
    """The dispatch protocol: why `fn` cannot run here on these tensors, or None.
    layer_norm(x, w, b); add_layer_norm(x, residual, w, b)."""
    if fn == "layer_norm":
        return unsupported(args[0], None, *args[1:])
    if fn == "add_layer_norm":
        return unsupported(args[0], *args[1:])
    return f"{fn} is not implemented in this module"


def supports(fn: str, *tensors: torch.Tensor) -> bool:
    return why_unsupported(fn, *tensors) is None
