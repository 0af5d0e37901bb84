"""The DeepSpeed engine: config generated from ours, AdamW param groups, a skippable optimizer.

ZeRO stage, precision, gradient accumulation and clipping are DeepSpeed's; the optimizer is
torch's AdamW (fused on CUDA), DeepSpeed's FusedAdam, or apex's FusedAdam, wrapped so that the
training loop can veto one update (a non-finite loss on any rank) identically under every
ZeRO stage and precision. The learning rate is set by the loop from `schedule.learning_rate`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from megatron_style.config import PretrainConfig

# Parameters that AdamW must not decay: norms, biases, embeddings and learned tokens.
_NO_DECAY_SUFFIXES = ("cls_token", "mask_token", "text_embed.weight", "pos_vision.weight",
                      "pos_text.weight")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(_NO_DECAY_SUFFIXES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


class SkippableStep:
    """Mixin for an optimizer class: `skip_next = True` turns the next step() into a no-op.
    DeepSpeed calls the wrapped optimizer's step() on its (flat, partitioned) fp32 master
    weights under every ZeRO stage, so vetoing here leaves weights and moments untouched."""

    skip_next = False

    def step(self, closure=None):  # type: ignore[override]
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)  # type: ignore[misc]


def _optimizer_class(impl: str, device: torch.device):
    if impl == "torch":
        return torch.optim.AdamW, {"fused": True} if device.type == "cuda" else {"foreach": False}
    if impl == "deepspeed":
        if device.type == "cuda":
            from deepspeed.ops.adam import FusedAdam
            return FusedAdam, {"adam_w_mode": True}
        return torch.optim.AdamW, {"foreach": False}
    if impl == "apex":
        from kernels.apex_backends import fused_adam_class
        cls = fused_adam_class()
        if cls is None:
            raise RuntimeError("optim.impl=apex but NVIDIA apex is not installed; use torch or deepspeed")
        return cls, {"adam_w_mode": True}
    raise ValueError(f"optim.impl {impl!r} is not one of torch, deepspeed, apex")


def build_optimizer(model: nn.Module, cfg: PretrainConfig, device: torch.device):
    o = cfg.optim
    base, extra = _optimizer_class(o.impl, device)
    cls = type(f"Skippable{base.__name__}", (SkippableStep, base), {})
    return cls(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, **extra)


def deepspeed_config(cfg: PretrainConfig) -> dict[str, Any]:
    p = cfg.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    ds: dict[str, Any] = {
        # One DeepSpeed "sample" is one packed micro-batch of data.micro_batch_size samples.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": p.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": p.precision == "bf16"},
        "fp16": {"enabled": p.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if p.deepspeed_file:
        import json
        with open(p.deepspeed_file) as f:
            ds = _merge(ds, json.load(f))
    return _merge(ds, p.deepspeed)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_engine(model: nn.Module, cfg: PretrainConfig, device: torch.device, mpu: Optional[Any] = None):
    import deepspeed

    if cfg.parallel.zero_stage == 3:
        # The blocks apply their sub-modules' weights themselves (grouped ops): tell ZeRO-3
        # which module needs which parameters, so it gathers them per block for forward and
        # backward (megatron_style/parallel/zero3.py).
        from megatron_style.parallel.zero3 import register_zero3_parameters
        register_zero3_parameters(model, model.beit3.layers)
    optimizer = build_optimizer(model, cfg, device)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=deepspeed_config(cfg), mpu=mpu)
    return engine, optimizer


def base_optimizer(optimizer) -> SkippableStep:
    """The wrapped torch optimizer inside DeepSpeed's ZeRO / mixed-precision wrapper."""
    seen = optimizer
    for _ in range(4):
        if isinstance(seen, SkippableStep):
            return seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    raise RuntimeError(f"could not find the training optimizer inside {type(optimizer).__name__}")


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
