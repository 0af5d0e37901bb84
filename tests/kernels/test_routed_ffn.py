"""Grouped GEMM and grouped LayerNorm (Triton) against the per-expert PyTorch reference."""
import pytest
import torch

from kernels.routed_ffn import reference

tg = pytest.importorskip("kernels.routed_ffn.triton_grouped")


def _params(counts, k, n, dtype, device, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), k, generator=g)
    ws = [torch.randn(n, k, generator=g) / k ** 0.5 for _ in counts]
    bs = [torch.randn(n, generator=g) if bias else None for _ in counts]
    dy = torch.randn(sum(counts), n, generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), [cast(w) for w in ws], [cast(b) for b in bs], cast(dy)


def _grads(fn, x, ws, bs, dy, dtype, counts, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() for t in [x, *ws, *[b for b in bs if b is not None]]]
    x_, ws_ = leaves[0], leaves[1:1 + len(ws)]
    bs_ = leaves[1 + len(ws):] if bs[0] is not None else [None] * len(ws)
    y = fn(x_, counts, ws_, bs_, **kw)
    y.backward(dy.to(dtype))
    return y, [t.grad for t in leaves]


# Interpreter blocks are 64 rows x 64 columns x 64 deep: 70 rows make two tiles for the
# vision expert, none for the empty language expert, 45 rows one tile for VL; K = 96 takes an
# uneven second step; 80 outputs make a full and a partial column tile.
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("counts,act,bias", [((70, 0, 45), "gelu", True), ((33,), None, False),
                                             ((0, 17), None, True)])
def test_grouped_linear_matches_reference(counts, act, bias, dtype, device, close):
    x, ws, bs, dy = _params(counts, 96, 80, dtype, device, bias)
    y, g = _grads(tg.grouped_linear, x, ws, bs, dy, dtype, counts, activation=act)
    y_ref, g_ref = _grads(reference.grouped_linear, x, ws, bs, dy, torch.float32, counts, activation=act)
    assert y.dtype == dtype
    close(y, y_ref, dtype, "output")
    names = ["dx"] + [f"dW{e}" for e in range(len(counts))] + ([f"db{e}" for e in range(len(counts))] if bias else [])
    for a, b, name in zip(g, g_ref, names):
        close(a, b, dtype, name)
    # An expert without tokens still gets a gradient, and it is exactly zero (ZeRO needs one).
    for e, c in enumerate(counts):
        if c == 0:
            assert g[1 + e] is not None and not g[1 + e].any()
            if bias:
                assert not g[1 + len(counts) + e].any()


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_layer_norm_matches_reference(dtype, device, close):
    counts = (21, 0, 9)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(30, 40, generator=g) * 3 + 1).to(device=device, dtype=dtype)
    ws = [torch.randn(40, generator=g).to(device=device, dtype=dtype) for _ in counts]
    bs = [torch.randn(40, generator=g).to(device=device, dtype=dtype) for _ in counts]
    dy = torch.randn(30, 40, generator=g).to(device=device, dtype=dtype)

    def run(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in [x, *ws, *bs]]
        y = fn(leaves[0], counts, leaves[1:4], leaves[4:], 1e-5)
        y.backward(dy.to(dt))
        return y, [t.grad for t in leaves]

    y, grads = run(tg.grouped_layer_norm, dtype)
    y_ref, grads_ref = run(reference.grouped_layer_norm, torch.float32)
    close(y, y_ref, dtype, "output")
    for a, b, name in zip(grads, grads_ref, ["dx", "dw0", "dw1", "dw2", "db0", "db1", "db2"]):
        close(a, b, dtype, name)
    assert not grads[2].any() and not grads[5].any()  # the empty group's weight and bias


def test_clear_errors(device):
    x = torch.zeros(5, 8, device=device)
    w = torch.zeros(4, 8, device=device)
    b = torch.zeros(4, device=device)
    with pytest.raises(ValueError, match=r"\[2, 2\] must be >= 0 and sum to the 5 rows"):
        tg.grouped_linear(x, (2, 2), [w, w], [b, b])
    with pytest.raises(ValueError, match="1..3 groups"):
        tg.grouped_linear(x, (1, 1, 1, 2), [w] * 4, [b] * 4)
    with pytest.raises(ValueError, match="every expert or for none"):
        tg.grouped_linear(x, (3, 2), [w, w], [b, None])
    with pytest.raises(ValueError, match="'relu'"):
        tg.grouped_linear(x, (5,), [w], [b], activation="relu")
    assert "mixed dtypes" in tg.why_unsupported("grouped_linear", x.half(), w, b)


@pytest.mark.gpu
@pytest.mark.parametrize("counts", [(1000, 0, 300), (517, 1203)])
def test_bf16_on_gpu(counts, close):
    x, ws, bs, dy = _params(counts, 1408, 768, torch.bfloat16, "cuda", True)
    y, g = _grads(tg.grouped_linear, x, ws, bs, dy, torch.bfloat16, counts, activation="gelu")
    y_ref, g_ref = _grads(reference.grouped_linear, x, ws, bs, dy, torch.float32, counts, activation="gelu")
    close(y, y_ref, torch.bfloat16, "output")
    for a, b in zip(g, g_ref):
        # dW sums over up to 1200 rows: compare relative to its own scale.
        close(a / max(1.0, b.abs().max().item()), b / max(1.0, b.abs().max().item()), torch.bfloat16, "grad")


@pytest.mark.interpreter
def test_frozen_experts_still_give_the_input_gradient(device, close):
    x, ws, bs, dy = _params((20, 12), 32, 48, torch.float32, device, True)
    xg = x.clone().requires_grad_()
    tg.grouped_linear(xg, (20, 12), ws, bs, "gelu").backward(dy)
    xr = x.clone().requires_grad_()
    reference.grouped_linear(xr, (20, 12), ws, bs, "gelu").backward(dy)
    close(xg.grad, xr.grad, torch.float32, "dx")
