"""Shared helpers for the model tests: random non-trivial weights, and torchscale's BEiT3 as
the reference implementation when it is installed."""
import importlib.util
import sys
import types

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread():
    """These tests run small tensors: on a busy 2-core machine two intra-op threads mostly wait
    for each other (this folder took 26 s with 2 threads, 7 s with 1, at load 6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Every parameter, LayerNorms included, drawn from N(0, std): unlike the init (ones, zeros,
    equal ways) this makes every mix-up of ways, experts or norms visible in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(scope="session")
def randomize():
    """randomize(module, std=0.1, seed=0): see _randomize."""
    return _randomize


def _install_timm_stub() -> None:
    """torchscale imports `timm.models.layers.drop_path` and nothing else from timm. Installing
    timm would pull torchvision and a CUDA build of torch, so when timm is absent this stub
    provides that one function (timm's per-sample stochastic depth)."""
    if importlib.util.find_spec("timm") is not None:
        return

    def drop_path(x, drop_prob=0.0, training=False):
        if drop_prob == 0.0 or not training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - drop_prob)
        return x * keep / (1 - drop_prob)

    mods = {n: types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers")}
    mods["timm.models.layers"].drop_path = drop_path
    sys.modules.update(mods)


@pytest.fixture(scope="session")
def torchscale_beit3():
    """(BEiT3, EncoderConfig) from microsoft/torchscale; the test is skipped without it."""
    try:
        import torchscale  # noqa: F401
    except ImportError:
        pytest.skip("torchscale is not installed (pip install --no-deps torchscale==0.3.0 fairscale)")
    _install_timm_stub()
    try:
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3
    except ImportError as e:  # e.g. fairscale missing
        pytest.skip(f"torchscale does not import: {e}")
    return BEiT3, EncoderConfig


@pytest.fixture(scope="session")
def giant_on_meta():
    """The giant preset's MaskedDataModel on the meta device (shapes only), built once."""
    from megatron_style.config import model_config
    from megatron_style.model.flops import build_on_meta
    return build_on_meta(model_config("giant"))
