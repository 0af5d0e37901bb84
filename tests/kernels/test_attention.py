"""Varlen attention (Triton) against the padded-SDPA reference, forward and backward."""
import pytest
import torch

from kernels.attention import reference
from kernels.triton_support import head_dim_chunks

ta = pytest.importorskip("kernels.attention.triton_attention")

# One-token samples, samples shorter than a tail tile, exactly one block, a block plus a
# small tail (16-wide tile) and a block plus a long tail (masked full tile): with the
# interpreter's 32 x 32 blocks every code path of the three kernels runs.
LENS = [1, 5, 37, 50, 64, 17, 16]


def _packed(lens, heads, dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    # q, k, v sliced from one fused [T, 3, H, D] tensor, as the model makes them.
    qkv = torch.randn(T, 3, heads, dim, generator=g).to(device=device, dtype=dtype)
    do = torch.randn(T, heads, dim, generator=g).to(device=device, dtype=dtype)
    return qkv, cu, do


def _run(fn, qkv, cu, max_len, do, dtype):
    qkv = qkv.detach().to(dtype).requires_grad_()
    q, k, v = qkv.unbind(1)
    o = fn(q, k, v, cu, max_len, None)
    o.backward(do.to(dtype))
    return o, qkv.grad


def _check(lens, heads, dim, dtype, device, close):
    qkv, cu, do = _packed(lens, heads, dim, dtype, device)
    o, g = _run(ta.varlen_attention, qkv, cu, max(lens), do, dtype)
    # The reference sees the same rounded inputs, computed in fp32.
    o_ref, g_ref = _run(reference.varlen_attention, qkv, cu, max(lens), do, torch.float32)
    assert o.dtype == dtype
    close(o, o_ref, dtype, "output")
    for i, name in enumerate("qkv"):
        close(g[:, i], g_ref[:, i], dtype, f"d{name}")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim", [88, 64])
def test_matches_reference_ragged(dim, dtype, device, close):
    _check(LENS, 2, dim, dtype, device, close)


@pytest.mark.interpreter
def test_head_dim_below_a_tile_and_single_sample(device, close):
    # D = 8 pads to one 16-wide chunk; one sample spanning the whole stream.
    _check([23], 1, 8, torch.float32, device, close)


@pytest.mark.interpreter
def test_samples_do_not_see_each_other(device):
    qkv, cu, _ = _packed([6, 6], 1, 16, torch.float32, device)
    q, k, v = qkv.unbind(1)
    o = ta.varlen_attention(q, k, v, cu, 6)
    v2 = v.clone()
    v2[6:] += 100.0  # change only the second sample's values
    o2 = ta.varlen_attention(q, k, v2, cu, 6)
    assert torch.equal(o[:6], o2[:6])
    assert not torch.allclose(o[6:], o2[6:])


def test_head_dim_chunks_avoid_power_of_two_padding():
    assert head_dim_chunks(88) == (64, 32)
    assert head_dim_chunks(96) == (64, 32)
    assert head_dim_chunks(64) == (64, 0)
    assert head_dim_chunks(128) == (128, 0)
    assert head_dim_chunks(80) == (64, 16)
    assert head_dim_chunks(8) == (16, 0)
    assert sum(head_dim_chunks(88)) < 128


def test_clear_errors(device):
    q = torch.zeros(4, 2, 16, device=device)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"\(4, 2, 16\), \(4, 2, 8\)"):
        ta.varlen_attention(q, q, q[..., :8], cu, 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ta.varlen_attention(q, q, q, cu.float(), 4)
    if device == "cpu":
        with pytest.raises(ValueError, match="a sample has 4 tokens but max_seqlen is 3"):
            ta.varlen_attention(q, q, q, cu, 3)
        with pytest.raises(ValueError, match=r"rise from 0 to the 4 tokens, got \[0, 5\]"):
            ta.varlen_attention(q, q, q, torch.tensor([0, 5], dtype=torch.int32), 5)
    big = torch.zeros(4, 1, 160, device=device)
    assert "head dim 160" in ta.why_unsupported("varlen_attention", big, big, big)
    assert not ta.supports("varlen_attention", q.long(), q.long(), q.long())


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [88, 64, 96, 128])
def test_bf16_on_gpu(dim, close):
    _check([257, 1, 100, 257, 33], 4, dim, torch.bfloat16, "cuda", close)
