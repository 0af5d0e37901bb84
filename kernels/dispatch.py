"""The one place where the model chooses between Triton kernels and PyTorch references.

Modes (config `model.kernels`, or `with dispatch.mode("reference"):` for comparisons):
  auto       Triton for fp16 / bf16 CUDA tensors when Triton imports and the kernel supports
             the inputs; the reference otherwise (CPU, fp32, no Triton, unsupported shape).
  triton     always Triton (on CPU tensors this needs TRITON_INTERPRET=1); errors if missing.
  reference  always the PyTorch reference.

Each Triton module (kernels/<name>/triton_*.py) exposes the same functions as its reference
plus `supports(fn, *tensors) -> bool` and `why_unsupported(fn, *tensors) -> str | None` (device,
dtype and shape limits). `auto` falls back to the reference when a kernel says no; `triton`
raises with the kernel's reason instead, so a forced run never silently measures the reference.
`backend(fn, *tensors)` says which one a call would take.

`disable(fn, reason)` takes one kernel out of `auto` (the run's start-up self-check does this
for a kernel that failed on this device: kernels/selfcheck.py); `triton` mode ignores it.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Iterator, Optional, Sequence

import torch

from kernels.attention import reference as attention_ref
from kernels.cross_entropy import reference as ce_ref
from kernels.layernorm import reference as ln_ref
from kernels.routed_ffn import reference as ffn_ref

MODES = ("auto", "triton", "reference")
# `auto` sends only half-precision work to Triton: the kernels are tuned for fp16 / bf16, while
# for fp32 cuBLAS (TF32 where allowed) and torch's attention are the better choice. `triton`
# still runs fp32 (true fp32 products), for tests and debugging.
AUTO_DTYPES = (torch.float16, torch.bfloat16)
_mode = os.environ.get("MEGATRON_STYLE_KERNELS", "auto")
if _mode not in MODES:
    raise ValueError(f"MEGATRON_STYLE_KERNELS={_mode!r} is not one of {MODES}")

# function name -> module that holds its Triton implementation
_TRITON_MODULES = {
    "varlen_attention": "kernels.attention.triton_attention",
    "grouped_linear": "kernels.routed_ffn.triton_grouped",
    "grouped_layer_norm": "kernels.routed_ffn.triton_grouped",
    "layer_norm": "kernels.layernorm.triton_layernorm",
    "add_layer_norm": "kernels.layernorm.triton_layernorm",
    "masked_token_loss": "kernels.cross_entropy.triton_cross_entropy",
}
_loaded: dict[str, object] = {}
# function name -> why `auto` must not use its Triton kernel in this process
_disabled: dict[str, str] = {}


def set_mode(m: str) -> None:
    global _mode
    if m not in MODES:
        raise ValueError(f"kernel mode {m!r} is not one of {MODES}")
    _mode = m


def get_mode() -> str:
    return _mode


@contextlib.contextmanager
def mode(m: str) -> Iterator[None]:
    old = _mode
    set_mode(m)
    try:
        yield
    finally:
        set_mode(old)


def disable(fn: str, reason: str) -> None:
    """From now on `auto` runs the reference for `fn` (`triton` mode still runs Triton: a forced
    run must never silently measure the reference)."""
    if fn not in _TRITON_MODULES:
        raise ValueError(f"{fn!r} has no Triton kernel to disable; kernels: {sorted(_TRITON_MODULES)}")
    _disabled[fn] = reason


def enable(fn: Optional[str] = None) -> None:
    """Undo `disable` for `fn`, or for every kernel when fn is None."""
    if fn is None:
        _disabled.clear()
    else:
        _disabled.pop(fn, None)


def disabled() -> dict[str, str]:
    """The disabled kernels and why (a copy)."""
    return dict(_disabled)


def triton_module(fn: str):
    """The module holding `fn`'s Triton kernel, or the exception importing it raised."""
    return _triton_module(fn)


def _triton_module(fn: str):
    name = _TRITON_MODULES[fn]
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a broken Triton install means "reference" in auto
            _loaded[name] = e
    return _loaded[name]


def _pick(fn: str, *args):
    """The Triton module to use for `fn` on these inputs, or None for the reference. `args`
    are the call's tensors (None for absent optional ones)."""
    if _mode == "reference":
        return None
    if _mode == "auto" and not all(t.is_cuda for t in args if t is not None):
        return None  # decided before importing: Triton modules are only loaded when usable
    if _mode == "auto" and (args[0].dtype not in AUTO_DTYPES or fn in _disabled):
        return None
    mod = _triton_module(fn)
    if isinstance(mod, Exception):
        if _mode == "triton":
            raise RuntimeError(f"kernel mode 'triton' asked for {fn}, but its Triton module "
                               f"could not be imported: {mod}")
        return None
    problem = mod.why_unsupported(fn, *args)
    if problem is None:
        return mod
    if _mode == "triton":
        raise ValueError(f"kernel mode 'triton': the Triton {fn} cannot take these inputs: "
                         f"{problem}. Set model.kernels to 'auto' to fall back to PyTorch.")
    return None


def backend(fn: str, *args) -> str:
    """"triton" or "reference": what a call of `fn` with these tensors would run now."""
    if fn not in _TRITON_MODULES:
        return "reference"
    return "reference" if _pick(fn, *args) is None else "triton"


def triton_available(fn: str) -> bool:
    """Whether `fn`'s Triton kernel imports and has not been disabled."""
    return fn not in _disabled and not isinstance(_triton_module(fn), Exception)


# --- the entry points the model calls ---------------------------------------------------------

def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: Optional[float] = None) -> torch.Tensor:
    mod = _pick("varlen_attention", q, k, v)
    impl = attention_ref if mod is None else mod
    return impl.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)


def padded_attention(q, k, v, key_padding_mask=None, scale=None) -> torch.Tensor:
    # The padded layout exists for parity with the reference implementation; SDPA serves it.
    return attention_ref.padded_attention(q, k, v, key_padding_mask, scale)


def grouped_linear(x: torch.Tensor, counts: Sequence[int], weights, biases,
                   activation: Optional[str] = None) -> torch.Tensor:
    mod = _pick("grouped_linear", x, *weights, *biases)
    impl = ffn_ref if mod is None else mod
    return impl.grouped_linear(x, counts, weights, biases, activation)


def grouped_layer_norm(x: torch.Tensor, counts: Sequence[int], weights, biases,
                       eps: float) -> torch.Tensor:
    mod = _pick("grouped_layer_norm", x, *weights, *biases)
    impl = ffn_ref if mod is None else mod
    return impl.grouped_layer_norm(x, counts, weights, biases, eps)


def grouped_add_bias(x: torch.Tensor, counts: Sequence[int], biases) -> torch.Tensor:
    # Memory-bound and small next to the GEMMs around it; the reference serves every mode.
    return ffn_ref.grouped_add_bias(x, counts, biases)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mod = _pick("layer_norm", x, weight, bias)
    impl = ln_ref if mod is None else mod
    return impl.layer_norm(x, weight, bias, eps)


def add_layer_norm(x, residual, weight, bias, eps):
    mod = _pick("add_layer_norm", x, residual, weight, bias)
    impl = ln_ref if mod is None else mod
    return impl.add_layer_norm(x, residual, weight, bias, eps)


def masked_token_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mod = _pick("masked_token_loss", hidden, weight, bias, targets)
    impl = ce_ref if mod is None else mod
    return impl.masked_token_loss(hidden, weight, bias, targets)
