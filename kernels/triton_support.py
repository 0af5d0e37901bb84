"""What every Triton kernel module shares: where kernels can run, block-size choices, and the
head-dimension split.

Triton reads TRITON_INTERPRET when a kernel is *defined*, so `INTERPRETER` is fixed when this
module is first imported (tests/conftest.py sets the variable before that on CPU machines).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl  # noqa: F401  (the interpreter wants tl visible to jit functions)

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Dtypes every kernel takes. fp32 is accepted for tests and debugging (dots run in IEEE fp32);
# training runs in fp16 / bf16 with fp32 accumulation inside the kernels.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def device_problem(*tensors: torch.Tensor) -> Optional[str]:
    """Why these tensors cannot go through a Triton kernel in this process, or None."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        return f"tensors are on different devices {sorted(map(str, devices))}"
    dev = next(iter(devices))
    if dev.type == "cuda":
        return None if not INTERPRETER else "TRITON_INTERPRET=1 is set, which runs kernels on CPU tensors only"
    if dev.type == "cpu":
        return None if INTERPRETER else ("Triton runs on CPU tensors only under its interpreter: set "
                                         "TRITON_INTERPRET=1 before importing the kernels")
    return f"device {dev} is not supported (cuda, or cpu under TRITON_INTERPRET=1)"


def dtype_problem(*tensors: torch.Tensor) -> Optional[str]:
    dtypes = {t.dtype for t in tensors if t is not None}
    bad = [d for d in dtypes if d not in FLOAT_DTYPES]
    if bad:
        return f"dtype {bad[0]} is not supported (float16, bfloat16, float32)"
    if len(dtypes) > 1:
        return f"mixed dtypes {sorted(map(str, dtypes))}: cast the inputs to one dtype"
    return None


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: fp32 inputs get true fp32 products (TF32 would differ from the
    reference by ~1e-3); half inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def configs(gpu: Sequence[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """Autotune candidates: a few Hopper-oriented configs on GPU; one small config under the
    interpreter (it is slow per program, and one config means no benchmarking there)."""
    return [interpreter] if INTERPRETER else list(gpu)


def pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def head_dim_chunks(d: int) -> tuple[int, int]:
    """Split a head dimension into at most two power-of-two chunks (Triton tiles must be powers
    of two, and tl.dot needs each dimension >= 16): (D0, D1) with D0 the largest power of two
    <= d and D1 the smallest power of two covering the rest (0 when d is a power of two).

        64 -> (64, 0)   88 -> (64, 32)   96 -> (64, 32)   128 -> (128, 0)   80 -> (64, 16)

    Head dim 88 thus costs 96 columns of matrix work instead of 128 when padded to the next
    power of two (the giant's 16 x 88 heads: -25% work in every attention matmul)."""
    if d < 1:
        raise ValueError(f"head dim must be positive, got {d}")
    d0 = max(16, pow2_floor(d))
    rest = d - d0
    d1 = 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))
    return d0, d1


@triton.jit
def pick3(e, p0, p1, p2):
    """Among up to three per-expert pointers (or values), the one of expert e: lets one grouped
    launch serve the vision, language and vision-language experts without a pointer table."""
    p = p0
    if e == 1:
        p = p1
    elif e == 2:
        p = p2
    return p
