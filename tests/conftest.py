import glob
import os
import sys

import pytest
import torch

# Triton kernels run on CPU tensors only under its interpreter, and the switch is read when a
# kernel is defined: set it before anything imports a kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megatron_style.config import model_config  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_cfg():
    return model_config("tiny")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_leaked_comm_buffers():
    """Tests that start DeepSpeed themselves (not through the trainer, which removes its
    buffers' names: train/distributed.py) would each leave 66 MB per rank in /dev/shm; their
    processes have exited when the test ends, so whatever they left can go."""
    pattern = "/dev/shm/deepspeed_allreduce_buffer_*"
    before = set(glob.glob(pattern))
    yield
    for path in set(glob.glob(pattern)) - before:
        try:
            os.unlink(path)
        except OSError:
            pass
