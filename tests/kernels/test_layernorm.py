"""LayerNorm and residual-add + LayerNorm (Triton) against torch, forward and backward."""
import pytest
import torch

from kernels.layernorm import reference

tln = pytest.importorskip("kernels.layernorm.triton_layernorm")


def _inputs(shape, dtype, param_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = shape[-1]
    x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    r = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(D, generator=g).to(device=device, dtype=param_dtype)
    b = torch.randn(D, generator=g).to(device=device, dtype=param_dtype)
    return x, r, w, b


def _leaves(ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32),
                                               (torch.float16, torch.float16),
                                               (torch.float16, torch.float32)])
@pytest.mark.parametrize("shape", [(3, 37, 88), (5, 1)])
def test_layer_norm_matches_reference(shape, dtype, param_dtype, device, close):
    x, _, w, b = _inputs(shape, dtype, param_dtype, device)
    dy = torch.randn_like(x)
    x1, w1, b1 = _leaves([x, w, b])
    y = tln.layer_norm(x1, w1, b1, 1e-5)
    y.backward(dy)
    x2, w2, b2 = _leaves([x, w, b], torch.float32)
    y_ref = reference.layer_norm(x2, w2, b2, 1e-5)
    y_ref.backward(dy.float())
    assert y.dtype == dtype and w1.grad.dtype == param_dtype
    close(y, y_ref, dtype, "output")
    close(x1.grad, x2.grad, dtype, "dx")
    # dw, db sum over every row: compare relative to their own size.
    for a, e, name in ((w1.grad, w2.grad, "dw"), (b1.grad, b2.grad, "db")):
        s = max(1.0, e.abs().max().item())
        close(a / s, e / s, dtype, name)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_layer_norm_matches_reference(dtype, device, close):
    x, r, w, b = _inputs((70, 64), dtype, dtype, device)
    dy, ds = torch.randn_like(x), torch.randn_like(x)
    leaves = _leaves([x, r, w, b])
    y, s = tln.add_layer_norm(*leaves, 1e-5)
    # Both outputs carry gradient: the normalised branch and the residual stream.
    (y.float() * dy.float()).sum().backward(retain_graph=True)
    (s.float() * ds.float()).sum().backward()
    ref = _leaves([x, r, w, b], torch.float32)
    y_ref, s_ref = reference.add_layer_norm(*ref, 1e-5)
    ((y_ref * dy.float()).sum() + (s_ref * ds.float()).sum()).backward()
    close(s, (x + r).float(), dtype, "sum")  # rounded to the input dtype like x + r
    close(y, y_ref, dtype, "output")
    for a, e, name in zip(leaves, ref, ["dx", "dresidual", "dw", "db"]):
        sc = max(1.0, e.grad.abs().max().item())
        close(a.grad / sc, e.grad / sc, dtype, name)
    assert leaves[0].grad.data_ptr() != leaves[1].grad.data_ptr()


@pytest.mark.interpreter
def test_no_rows(device):
    x = torch.zeros(0, 16, device=device, requires_grad=True)
    w = torch.ones(16, device=device, requires_grad=True)
    b = torch.zeros(16, device=device, requires_grad=True)
    y = tln.layer_norm(x, w, b, 1e-5)
    y.sum().backward()
    assert y.shape == (0, 16) and not w.grad.any() and not b.grad.any()


def test_clear_errors(device):
    x = torch.zeros(4, 16, device=device)
    with pytest.raises(ValueError, match=r"weight has shape \(8,\); expected \(16,\)"):
        tln.layer_norm(x, torch.ones(8, device=device), torch.zeros(16, device=device), 1e-5)
    assert "affine" in tln.why_unsupported("layer_norm", x, None, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [1408, 6144])
def test_bf16_on_gpu(dim, close):
    x, r, w, b = _inputs((4113, dim), torch.bfloat16, torch.bfloat16, "cuda")
    leaves = _leaves([x, r, w, b])
    y, s = tln.add_layer_norm(*leaves, 1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = _leaves([x, r, w, b], torch.float32)
    y_ref, _ = reference.add_layer_norm(*ref, 1e-5)
    y_ref.backward(dy.float())
    close(y, y_ref, torch.bfloat16, "output")
    for a, e in zip(leaves, ref):
        sc = max(1.0, e.grad.abs().max().item())
        close(a.grad / sc, e.grad / sc, torch.bfloat16, "grad")
