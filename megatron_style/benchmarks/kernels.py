"""Kernel microbenchmarks at the giant's shapes, as a markdown table for BENCHMARKS.md.

    python -m megatron_style.benchmarks.kernels [--out kernels.md] [--only attention,ffn,layernorm,ce]
    python -m megatron_style.benchmarks.kernels --smoke     # tiny shapes, CPU under TRITON_INTERPRET=1: checks the
                                        # script runs; its timings mean nothing

Every case times forward + backward (CUDA events through triton.testing.do_bench, median) of
the Triton kernel and of its baselines on the same inputs, after checking that they agree.
Columns: time, a rate (TFLOP/s of the useful matrix work, or GB/s of the nominal traffic),
and `baseline / Triton` (time ratio: above 1 means the Triton kernel is faster; for the CE
memory rows it is the peak-memory ratio Triton / naive, below 1 is better).

Goals on H100 bf16: attention >= 1.2x SDPA; routed FFN >= 0.95x one dense GEMM of the same
size; LayerNorm >= 1.5x torch; CE peak memory <= 25% of logits + torch cross_entropy.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# The giant (arXiv 2208.10442): hidden 1408, FFN 6144, 16 heads of 88, 257-token images.
DIM, FFN, HEADS, HEAD_DIM, IMAGE_TOKENS = 1408, 6144, 16, 88, 257
TEXT_VOCAB, VISUAL_VOCAB = 64010, 8192


@dataclass
class Row:
    kernel: str
    case: str
    impl: str
    ms: float
    rate: Optional[float] = None
    unit: str = ""
    ratio: Optional[float] = None   # baseline time / Triton time (memory rows: Triton / naive)
    note: str = ""


@dataclass
class Setup:
    device: str
    dtype: torch.dtype
    smoke: bool

    def scale(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full


def _timeit(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    t = time.perf_counter()  # the CPU smoke run: one call, the number only proves it ran
    fn()
    return (time.perf_counter() - t) * 1e3


def _peak_mib(fn: Callable[[], object], device: str) -> Optional[float]:
    """Peak memory allocated by fn() above what was allocated before, MiB (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _fwd_bwd(f: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor):
    """A closure running f(*inputs) forward and backward (gradients returned, not stored)."""
    def run():
        out = f(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out, inputs, grad, allow_unused=True)
    return run


def _leaves(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().requires_grad_() for t in ts]


def _agree(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 5e-2) -> None:
    err = (a.float() - b.float()).abs().max().item()
    scale = max(1.0, b.float().abs().max().item())
    if not err <= tol * scale:
        raise AssertionError(f"{what}: Triton and baseline disagree (max error {err:.3g})")


# ---- attention --------------------------------------------------------------------------------

def _attention_flops(lens: list[int], heads: int, dim: int) -> float:
    # Forward: Q K^T and P V, 2 flops per multiply-add; backward 2.5x (FlashAttention's count).
    return 3.5 * 4 * sum(n * n for n in lens) * heads * dim


def bench_attention(s: Setup) -> list[Row]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.attention import reference, triton_attention

    rows = []
    H, D = s.scale(HEADS, 1), s.scale(HEAD_DIM, 88)
    n_img = s.scale(32, 2)
    L = s.scale(IMAGE_TOKENS, 20)
    g = torch.Generator().manual_seed(0)

    def packed(lens):
        T = sum(lens)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=s.device)
        qkv = torch.randn(T, 3, H, D, generator=g).to(s.device, s.dtype)
        return _leaves(*qkv.unbind(1)), cu, torch.randn(T, H, D, generator=g).to(s.device, s.dtype)

    # (a) 32 images of 257 tokens: every sample the same length, so SDPA needs no padding.
    lens = [L] * n_img
    (q, k, v), cu, do = packed(lens)
    flops = _attention_flops(lens, H, D)
    ours = _fwd_bwd(lambda q, k, v: triton_attention.varlen_attention(q, k, v, cu, L), [q, k, v], do)
    t_ours = _timeit(ours, s.device)
    case = f"{n_img} x {L} tokens, {H} heads x {D}"
    rows.append(Row("attention", case, "Triton varlen", t_ours, flops / t_ours / 1e9, "TFLOP/s"))
    B = n_img
    qb, kb, vb = (t.detach().view(B, L, H, D).transpose(1, 2) for t in (q, k, v))
    qb, kb, vb = _leaves(qb, kb, vb)
    dob = do.view(B, L, H, D).transpose(1, 2)
    o_ref = triton_attention.varlen_attention(q, k, v, cu, L).view(B, L, H, D).transpose(1, 2)
    backends = [("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
                ("SDPA efficient", SDPBackend.EFFICIENT_ATTENTION)]
    if s.device != "cuda":
        backends = [("SDPA math", SDPBackend.MATH)]
    for name, backend in backends:
        def sdpa(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        try:
            _agree(sdpa(qb, kb, vb), o_ref, name)
            t = _timeit(_fwd_bwd(sdpa, [qb, kb, vb], dob), s.device)
            rows.append(Row("attention", case, name, t, flops / t / 1e9, "TFLOP/s", t / t_ours))
        except (RuntimeError, AssertionError) as e:
            rows.append(Row("attention", case, name, float("nan"), note=f"unavailable: {str(e)[:60]}"))

    # (b) a packed mixed batch: images, texts of 16-128 tokens, pairs of 257 + 16-64 tokens,
    # against the padded batch (pad to the longest, key mask, SDPA, unpad: the reference).
    n = s.scale(12, 1)
    lens = ([L] * n + torch.randint(16, s.scale(129, 40), (n,), generator=g).tolist()
            + [L + x for x in torch.randint(16, s.scale(65, 20), (n - n // 3,), generator=g).tolist()])
    (q, k, v), cu, do = packed(lens)
    flops = _attention_flops(lens, H, D)
    ms = max(lens)
    t_ours = _timeit(_fwd_bwd(lambda q, k, v: triton_attention.varlen_attention(q, k, v, cu, ms),
                              [q, k, v], do), s.device)
    case = f"{len(lens)} mixed samples ({sum(lens)} tokens, longest {ms})"
    rows.append(Row("attention", case, "Triton varlen", t_ours, flops / t_ours / 1e9, "TFLOP/s"))
    _agree(triton_attention.varlen_attention(q, k, v, cu, ms), reference.varlen_attention(q, k, v, cu, ms),
           "padded batch")
    t = _timeit(_fwd_bwd(lambda q, k, v: reference.varlen_attention(q, k, v, cu, ms), [q, k, v], do), s.device)
    rows.append(Row("attention", case, "padded batch + SDPA (reference)", t, flops / t / 1e9, "TFLOP/s",
                    t / t_ours))
    return rows


# ---- routed FFN -------------------------------------------------------------------------------

def bench_routed_ffn(s: Setup) -> list[Row]:
    from kernels import dispatch
    from kernels.routed_ffn import reference

    rows = []
    T = s.scale(32 * IMAGE_TOKENS, 90)
    D, Fd = s.scale(DIM, 32), s.scale(FFN, 64)
    g = torch.Generator().manual_seed(0)
    for counts in ([T * 3 // 5, T - T * 3 // 5], [T * 2 // 5, T * 3 // 10, T - T * 2 // 5 - T * 3 // 10]):
        E = len(counts)
        mk = lambda *shape, sc=1.0: (torch.randn(*shape, generator=g) * sc).to(s.device, s.dtype)  # noqa: E731
        x = mk(T, D)
        ln1 = [(1 + mk(D, sc=0.1), mk(D, sc=0.1)) for _ in range(E)]
        w1 = [mk(Fd, D, sc=D ** -0.5) for _ in range(E)]
        b1 = [mk(Fd, sc=0.1) for _ in range(E)]
        ln2 = [(1 + mk(Fd, sc=0.1), mk(Fd, sc=0.1)) for _ in range(E)]
        w2 = [mk(D, Fd, sc=Fd ** -0.5) for _ in range(E)]
        b2 = [mk(D, sc=0.1) for _ in range(E)]
        params = [p for e in range(E) for p in (*ln1[e], w1[e], b1[e], *ln2[e], w2[e], b2[e])]
        dy = mk(T, D)
        flops = 12.0 * T * D * Fd  # fc1 and fc2, forward (2 T D F each) and backward (twice that)

        def unpack(ps):
            per = [ps[i * 8:(i + 1) * 8] for i in range(E)]
            return [list(col) for col in zip(*per)]

        def grouped(x, *ps, mode="triton"):
            a, b, w1_, b1_, c, d, w2_, b2_ = unpack(ps)
            with dispatch.mode(mode):
                h = dispatch.grouped_layer_norm(x, counts, a, b, 1e-5)
                h = dispatch.grouped_linear(h, counts, w1_, b1_, "gelu")
                h = dispatch.grouped_layer_norm(h, counts, c, d, 1e-5)
                h = dispatch.grouped_linear(h, counts, w2_, [None] * E, None)
                return dispatch.grouped_add_bias(h, counts, b2_)

        expert_of_row = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
        expert_of_row = expert_of_row[torch.randperm(T, generator=g)].to(s.device)

        def loop(x, *ps):
            # What a plain PyTorch MoE layer does: gather each expert's rows, run, scatter back.
            a, b, w1_, b1_, c, d, w2_, b2_ = unpack(ps)
            out = torch.zeros_like(x)
            for e in range(E):
                idx = (expert_of_row == e).nonzero().squeeze(1)
                h = F.layer_norm(x.index_select(0, idx), (D,), a[e], b[e], 1e-5)
                h = reference.gelu(F.linear(h, w1_[e], b1_[e]))
                h = F.linear(F.layer_norm(h, (Fd,), c[e], d[e], 1e-5), w2_[e], b2_[e])
                out = out.index_add(0, idx, h)
            return out

        def dense(x, *ps):
            # One expert over every row: the same matrix work in single large GEMMs.
            a, b, w1_, b1_, c, d, w2_, b2_ = unpack(ps)
            h = reference.gelu(F.linear(F.layer_norm(x, (D,), a[0], b[0], 1e-5), w1_[0], b1_[0]))
            return F.linear(F.layer_norm(h, (Fd,), c[0], d[0], 1e-5), w2_[0], b2_[0])

        inputs = _leaves(x, *params)
        _agree(grouped(*inputs), grouped(*inputs, mode="reference"), "routed FFN")
        case = f"{T} tokens, experts {counts}, {D} -> {Fd} -> {D}"
        t_ours = _timeit(_fwd_bwd(grouped, inputs, dy), s.device)
        rows.append(Row("routed FFN", case, "Triton grouped (LN, fc1+GELU, LN, fc2)", t_ours,
                        flops / t_ours / 1e9, "TFLOP/s"))
        for name, f in (("dense: one expert, torch", dense),
                        ("loop over experts, index_select / index_add", loop),
                        ("reference grouped (split / cat)", lambda *a: grouped(*a, mode="reference"))):
            t = _timeit(_fwd_bwd(f, inputs, dy), s.device)
            rows.append(Row("routed FFN", case, name, t, flops / t / 1e9, "TFLOP/s", t / t_ours))

        # The fc1 GEMM alone (+ bias + GELU) against cuBLAS on all rows.
        xs, ws_, bs_ = _leaves(x), _leaves(*w1), _leaves(*b1)
        dz = mk(T, Fd)
        gemm_flops = 6.0 * T * D * Fd
        f_ours = lambda x, *p: dispatch.grouped_linear(x, counts, p[:E], p[E:], "gelu")  # noqa: E731
        with dispatch.mode("triton"):
            t_g = _timeit(_fwd_bwd(f_ours, xs + ws_ + bs_, dz), s.device)
        t_d = _timeit(_fwd_bwd(lambda x, w, b: reference.gelu(F.linear(x, w, b)), xs + ws_[:1] + bs_[:1], dz),
                      s.device)
        gcase = f"fc1 + GELU only, {T} x {D} -> {Fd}, {E} experts"
        rows.append(Row("routed FFN", gcase, "Triton grouped GEMM", t_g, gemm_flops / t_g / 1e9, "TFLOP/s"))
        rows.append(Row("routed FFN", gcase, "dense cuBLAS GEMM + GELU", t_d, gemm_flops / t_d / 1e9,
                        "TFLOP/s", t_d / t_g))
    return rows


# ---- LayerNorm --------------------------------------------------------------------------------

def bench_layernorm(s: Setup) -> list[Row]:
    from kernels.layernorm import triton_layernorm

    rows = []
    N = s.scale(32 * IMAGE_TOKENS, 300)
    g = torch.Generator().manual_seed(0)
    for D in (s.scale(DIM, 88), s.scale(FFN, 256)):
        mk = lambda *shape: torch.randn(*shape, generator=g).to(s.device, s.dtype)  # noqa: E731
        x, r, dy = mk(N, D), mk(N, D), mk(N, D)
        w, b = 1 + 0.1 * mk(D), 0.1 * mk(D)
        el = x.element_size()
        # Nominal traffic: forward reads x, writes y; backward reads x and dy, writes dx.
        nbytes = 5 * N * D * el
        inputs = _leaves(x, w, b)
        _agree(triton_layernorm.layer_norm(*inputs, 1e-5), F.layer_norm(x, (D,), w, b, 1e-5), "LayerNorm")
        case = f"LayerNorm {N} x {D}, forward + backward"
        t_ours = _timeit(_fwd_bwd(lambda x, w, b: triton_layernorm.layer_norm(x, w, b, 1e-5), inputs, dy), s.device)
        t_ref = _timeit(_fwd_bwd(lambda x, w, b: F.layer_norm(x, (D,), w, b, 1e-5), inputs, dy), s.device)
        rows.append(Row("LayerNorm", case, "Triton", t_ours, nbytes / t_ours / 1e6, "GB/s"))
        rows.append(Row("LayerNorm", case, "torch F.layer_norm", t_ref, nbytes / t_ref / 1e6, "GB/s", t_ref / t_ours))
        case = f"residual add + LayerNorm {N} x {D}, forward only"
        nbytes = 4 * N * D * el  # reads x, r; writes y, x + r
        t_ours = _timeit(lambda: triton_layernorm.add_layer_norm(x, r, w, b, 1e-5), s.device)
        t_ref = _timeit(lambda: F.layer_norm(x + r, (D,), w, b, 1e-5), s.device)
        rows.append(Row("LayerNorm", case, "Triton add_layer_norm", t_ours, nbytes / t_ours / 1e6, "GB/s"))
        rows.append(Row("LayerNorm", case, "torch x + r, F.layer_norm", t_ref, nbytes / t_ref / 1e6, "GB/s",
                        t_ref / t_ours))
    return rows


# ---- cross-entropy ----------------------------------------------------------------------------

def bench_cross_entropy(s: Setup) -> list[Row]:
    from kernels.cross_entropy import reference, triton_cross_entropy

    rows = []
    g = torch.Generator().manual_seed(0)
    D = s.scale(DIM, 64)
    for name, M, V in (("text", s.scale(4096, 40), s.scale(TEXT_VOCAB, 3000)),
                       ("visual", s.scale(8192, 60), s.scale(VISUAL_VOCAB, 1000))):
        h = torch.randn(M, D, generator=g).to(s.device, s.dtype)
        w = (torch.randn(V, D, generator=g) * 0.02).to(s.device, s.dtype)
        b = torch.zeros(V).to(s.device, s.dtype)
        t = torch.randint(0, V, (M,), generator=g).to(s.device)
        dl = torch.full((M,), 1.0 / M, device=s.device)
        inputs = _leaves(h, w, b)
        ours = _fwd_bwd(lambda h, w, b: triton_cross_entropy.masked_token_loss(h, w, b, t), inputs, dl)
        naive = _fwd_bwd(lambda h, w, b: reference.masked_token_loss(h, w, b, t), inputs, dl)
        _agree(triton_cross_entropy.masked_token_loss(h, w, b, t)[0], reference.masked_token_loss(h, w, b, t)[0],
               "cross-entropy")
        flops = 8.0 * M * V * D  # logits, recomputed logits, dh, dW (naive: 6 M V D)
        case = f"{name}: {M} masked tokens x vocab {V}, D {D}, forward + backward"
        t_ours, t_naive = _timeit(ours, s.device), _timeit(naive, s.device)
        rows.append(Row("cross-entropy", case, "Triton chunked (time)", t_ours, flops / t_ours / 1e9, "TFLOP/s"))
        rows.append(Row("cross-entropy", case, "logits + F.cross_entropy (time)", t_naive,
                        6.0 * M * V * D / t_naive / 1e9, "TFLOP/s", t_naive / t_ours))
        m_ours, m_naive = _peak_mib(ours, s.device), _peak_mib(naive, s.device)
        if m_ours is not None:
            rows.append(Row("cross-entropy", case, "Triton chunked (peak memory)", float("nan"), m_ours, "MiB",
                            m_ours / m_naive, "ratio = Triton / naive peak"))
            rows.append(Row("cross-entropy", case, "logits + F.cross_entropy (peak memory)", float("nan"),
                            m_naive, "MiB"))
    return rows


BENCHES = {"attention": bench_attention, "ffn": bench_routed_ffn, "layernorm": bench_layernorm,
           "ce": bench_cross_entropy}


def markdown(rows: list[Row], header: str = "") -> str:
    out = [header] if header else []
    out += ["| kernel | case | implementation | ms | rate | baseline / Triton | note |",
            "|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = "" if r.ms != r.ms else f"{r.ms:.3f}"
        rate = "" if r.rate is None else f"{r.rate:,.1f} {r.unit}"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        out.append(f"| {r.kernel} | {r.case} | {r.impl} | {ms} | {rate} | {ratio} | {r.note} |")
    return "\n".join(out)


def environment() -> str:
    import triton
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"
    return f"{dev}; torch {torch.__version__}; triton {triton.__version__}"


def run(only: list[str], smoke: bool) -> list[Row]:
    if smoke:
        s = Setup("cpu", torch.float16, True)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("kernel benchmarks need a CUDA device (or --smoke for a CPU dry run "
                             "under TRITON_INTERPRET=1)")
        s = Setup("cuda", torch.bfloat16, False)
    rows = []
    for name in only:
        if name not in BENCHES:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {sorted(BENCHES)}")
        rows += BENCHES[name](s)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {list(BENCHES)}")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script only")
    a = p.parse_args(argv)
    if a.smoke:
        # Before any kernel module is imported: Triton reads this when a kernel is defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rows = run([x for x in a.only.split(",") if x], a.smoke)
    how = "fp16 smoke run, timings meaningless" if a.smoke else "bf16, median of triton.testing.do_bench"
    table = markdown(rows, f"Measured on {environment()}; {how}.\n")
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
