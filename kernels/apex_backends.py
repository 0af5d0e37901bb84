"""Optional NVIDIA apex backends, used only where apex is already installed.

apex is not on the package index (the `apex` there is an unrelated project), but NVIDIA's
PyTorch containers ship it. Nothing here is required: every function says when apex is absent
and the callers keep their own paths (the Triton / PyTorch LayerNorm, torch or DeepSpeed Adam).

    available()          True when NVIDIA apex with its fused LayerNorm extension imports
    layer_norm(...)      apex FusedLayerNorm with the reference signature (x, w, b, eps)
    fused_adam_class()   apex.optimizers.FusedAdam, or None (the trainer's optim.impl=apex)
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def _import(module: str, attr: str):
    """module.attr, or None when it cannot be imported (apex absent, the unrelated PyPI
    `apex`, or an apex built without its CUDA extensions)."""
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return None


def _fused_layer_norm_affine():
    return _import("apex.normalization.fused_layer_norm", "fused_layer_norm_affine")


def available() -> bool:
    """NVIDIA apex with the fused LayerNorm; its CUDA extension loads on first use, so this
    also checks that `fused_layer_norm_cuda` imports."""
    return _fused_layer_norm_affine() is not None and _import("fused_layer_norm_cuda", "forward_affine") is not None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim through apex's fused CUDA kernel (forward and backward)."""
    fn = _fused_layer_norm_affine()
    if fn is None or not available():
        raise RuntimeError("apex fused LayerNorm is not available: NVIDIA apex is not installed "
                           "(it ships in NVIDIA's PyTorch containers; the pip package named "
                           "`apex` is unrelated). Use kernels.dispatch.layer_norm instead.")
    if not x.is_cuda:
        raise ValueError(f"apex LayerNorm runs on CUDA tensors only; x is on {x.device}")
    return fn(x, weight, bias, (x.shape[-1],), eps)


def fused_adam_class() -> Optional[type]:
    """apex.optimizers.FusedAdam (multi-tensor Adam/AdamW, adam_w_mode=True by default), or
    None when apex is absent: the caller then picks torch's fused AdamW or DeepSpeed's."""
    return _import("apex.optimizers", "FusedAdam")
