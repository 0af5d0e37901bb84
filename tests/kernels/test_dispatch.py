"""Which implementation kernels.dispatch picks in each mode, and that both agree."""
import pytest
import torch

from kernels import dispatch, triton_support


def _ln_args(device="cpu"):
    x = torch.randn(6, 16, device=device)
    return x, torch.ones(16, device=device), torch.zeros(16, device=device)


def test_modes_validate_and_restore():
    with pytest.raises(ValueError, match=r"'fast' is not one of \('auto', 'triton', 'reference'\)"):
        dispatch.set_mode("fast")
    dispatch.set_mode("auto")
    with dispatch.mode("reference"):
        assert dispatch.get_mode() == "reference"
    assert dispatch.get_mode() == "auto"


def test_reference_and_auto_use_pytorch_on_cpu():
    x, w, b = _ln_args()
    for m in ("reference", "auto"):
        with dispatch.mode(m):
            assert dispatch.backend("layer_norm", x, w, b) == "reference"
            assert dispatch.backend("varlen_attention", x, x, x) == "reference"
    # No Triton version: always the reference.
    assert dispatch.backend("grouped_add_bias", x) == "reference"


@pytest.mark.interpreter
@pytest.mark.skipif(not triton_support.INTERPRETER, reason="CPU tensors need the interpreter")
def test_triton_mode_runs_triton_on_cpu_under_the_interpreter():
    x, w, b = _ln_args()
    with dispatch.mode("triton"):
        assert dispatch.backend("layer_norm", x, w, b) == "triton"
        y = dispatch.layer_norm(x, w, b, 1e-5)
    with dispatch.mode("reference"):
        y_ref = dispatch.layer_norm(x, w, b, 1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_triton_mode_names_what_the_kernel_cannot_take(device):
    q = torch.zeros(4, 1, 160, device=device)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=device)
    with dispatch.mode("triton"), pytest.raises(ValueError, match="head dim 160 is above the supported 128"):
        dispatch.varlen_attention(q, q, q, cu, 4)
    # auto falls back to the reference instead.
    with dispatch.mode("auto"):
        assert dispatch.varlen_attention(q, q, q, cu, 4).shape == q.shape


def test_cpu_without_interpreter_is_explained(monkeypatch):
    monkeypatch.setattr(triton_support, "INTERPRETER", False)
    assert "TRITON_INTERPRET=1" in triton_support.device_problem(torch.zeros(1))


@pytest.mark.gpu
def test_auto_picks_triton_for_half_precision_cuda_tensors():
    x, w, b = (t.bfloat16() for t in _ln_args("cuda"))
    with dispatch.mode("auto"):
        assert dispatch.backend("layer_norm", x, w, b) == "triton"
        assert dispatch.backend("layer_norm", x.float(), w.float(), b.float()) == "reference"
        q = torch.zeros(4, 2, 160, device="cuda", dtype=torch.bfloat16)  # head dim above 128
        assert dispatch.backend("varlen_attention", q, q, q) == "reference"
    with dispatch.mode("triton"):
        assert dispatch.backend("layer_norm", x.float(), w.float(), b.float()) == "triton"
