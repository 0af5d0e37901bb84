"""The optional apex backends: absent here usually, so the checks skip; where NVIDIA apex is
installed its LayerNorm must agree with torch's."""
import pytest
import torch

from kernels import apex_backends


def test_absent_apex_is_reported_not_required():
    if apex_backends.available():
        pytest.skip("NVIDIA apex is installed here")
    assert apex_backends.fused_adam_class() is None or callable(apex_backends.fused_adam_class())
    with pytest.raises(RuntimeError, match="apex fused LayerNorm is not available"):
        apex_backends.layer_norm(torch.zeros(2, 4), torch.ones(4), torch.zeros(4), 1e-5)


@pytest.mark.gpu
def test_apex_layer_norm_matches_torch():
    if not apex_backends.available():
        pytest.skip("NVIDIA apex is not installed")
    x = torch.randn(64, 1408, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1408, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(1408, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = apex_backends.layer_norm(x, w, b, 1e-5)
    y_ref = torch.nn.functional.layer_norm(x.float(), (1408,), w.float(), b.float(), 1e-5)
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=5e-2)
    assert apex_backends.fused_adam_class() is not None
