"""Chunked masked-token loss (Triton) against logits + torch cross_entropy."""
import pytest
import torch

from kernels.cross_entropy import reference

tc = pytest.importorskip("kernels.cross_entropy.triton_cross_entropy")


def _inputs(M, D, V, dtype, device, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, D, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(V, D, generator=g) * 0.3).to(device=device, dtype=dtype)
    b = torch.randn(V, generator=g).to(device=device, dtype=dtype) if bias else None
    t = torch.randint(0, V, (M,), generator=g).to(device)
    return h, w, b, t


def _run(fn, h, w, b, t, dloss, **kw):
    leaves = [x.detach().requires_grad_() for x in (h, w, b) if x is not None]
    loss, am = fn(leaves[0], leaves[1], leaves[2] if b is not None else None, t, **kw)
    loss.backward(dloss)
    return loss, am, [x.grad for x in leaves]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("chunk,bias", [(128, True), (None, False)])
def test_matches_reference(chunk, bias, dtype, device, close):
    # V = 300 in chunks of 128: two full chunks and a 44-column tail; the target of one row is
    # -100 (ignored: loss 0, no gradient).
    h, w, b, t = _inputs(7, 32, 300, dtype, device, bias)
    t[3] = -100
    dloss = torch.randn(7, device=device)
    loss, am, g = _run(tc.masked_token_loss, h, w, b, t, dloss, chunk=chunk)
    loss_ref, am_ref, g_ref = _run(reference.masked_token_loss, h, w, b, t, dloss)
    assert loss.dtype == torch.float32 and loss[3] == 0
    close(loss, loss_ref, dtype, "loss")
    assert torch.equal(am, am_ref)
    for a, e, name in zip(g, g_ref, ["dhidden", "dweight", "dbias"]):
        close(a, e, dtype, name)


@pytest.mark.interpreter
def test_argmax_ties_take_the_first_column_across_chunks(device):
    h = torch.ones(2, 16, device=device)
    w = torch.zeros(40, 16, device=device)
    w[[5, 21, 37]] = 1.0  # equal best logits in chunks 0, 1 and 2 (chunk = 16)
    _, am = tc.masked_token_loss(h, w, None, torch.tensor([0, 1], device=device), chunk=16)
    assert am.tolist() == [5, 5]


def test_chunk_sizes_bound_the_live_logits():
    assert tc.chunk_columns(100, 8192) == 8192                  # small: one chunk
    c = tc.chunk_columns(4096, 64010)
    assert c % 256 == 0 and 4096 * c <= tc.CHUNK_ELEMENTS and c >= tc.MIN_CHUNK
    assert tc.chunk_columns(10 ** 6, 64010) == tc.MIN_CHUNK       # never narrower than this


def test_clear_errors(device):
    h, w, b, t = _inputs(3, 16, 50, torch.float32, device, True)
    with pytest.raises(ValueError, match=r"targets must be \[3\]"):
        tc.masked_token_loss(h, w, b, t[:2])
    if device == "cpu":
        with pytest.raises(ValueError, match=r"target 50 is outside the vocabulary \[0, 50\)"):
            tc.masked_token_loss(h, w, b, torch.tensor([0, 50, 1]))
    assert "float64" in tc.why_unsupported("masked_token_loss", h.double(), w.double(), None, t)


@pytest.mark.gpu
@pytest.mark.parametrize("V", [8192, 64010])
def test_bf16_on_gpu(V, close):
    h, w, b, t = _inputs(1500, 1408, V, torch.bfloat16, "cuda", True)
    dloss = torch.full((1500,), 1 / 1500, device="cuda")
    loss, am, g = _run(tc.masked_token_loss, h, w, b, t, dloss, chunk=4096)
    loss_ref, am_ref, g_ref = _run(reference.masked_token_loss, h, w, b, t, dloss)
    close(loss, loss_ref, torch.bfloat16, "loss")
    # bf16 logits can tie differently only where two logits round equal.
    assert (am == am_ref).float().mean() > 0.99
    for a, e in zip(g, g_ref):
        sc = max(1e-6, e.float().abs().max().item())
        close(a.float() / sc, e.float() / sc, torch.bfloat16, "grad")
