"""Shared pieces of the kernel tests: dtype tolerances and a clean dispatch mode per test.

The kernels run under the Triton interpreter here (tests/conftest.py sets TRITON_INTERPRET=1 on
machines without CUDA); shapes stay tiny because the interpreter runs every program in Python.
"""
import pytest
import torch

from kernels import dispatch
# Max error allowed, relative to max(1, largest reference magnitude): the kernels accumulate
# in fp32 but round inputs, probabilities and outputs to the input dtype as the references do.
# One table for these tests and the run's start-up self-check.
from kernels.selfcheck import TOL


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.float()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.float() - expected).abs().max().item() if expected.numel() else 0.0
    assert err == err, f"{what}: NaN in the result"
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype] * scale:.3g} ({dtype})"


@pytest.fixture
def close():
    """close(actual, expected, dtype, what): max-error check with the dtype's tolerance."""
    return _assert_close


@pytest.fixture(autouse=True)
def _restore_dispatch_mode():
    old = dispatch.get_mode()
    yield
    dispatch.set_mode(old)


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
