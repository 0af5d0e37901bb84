"""The DeepSpeed engine: config generated from ours, AdamW param groups, a skippable optimizer.

ZeRO stage, precision, gradient accumulation and clipping are DeepSpeed's; the optimizer is
torch's AdamW (fused on CUDA), DeepSpeed's FusedAdam, or apex's FusedAdam, wrapped so that the
training loop can veto an update (a non-finite loss on any rank) identically under every
ZeRO stage and precision:

    with skip_update(engine, skip=ranks_agreed_the_step_is_bad):
        engine.step()

The learning rate is set by the loop from `schedule.learning_rate`.

What DeepSpeed 0.19.8 does inside engine.step() at an accumulation boundary, and so what the
veto has to cover (tests/faults/test_nonfinite_skip.py checks every tensor of it):
  ZeRO-0 fp32       engine clips the gradients (a NaN norm makes them NaN, touches nothing
                    else), calls our optimizer's step() once, sets every .grad to None.
  ZeRO-0 bf16/fp16  FP16_UnfusedOptimizer (FP16_Optimizer with FusedAdam): checks overflow
                    always and skips by itself; otherwise unscales/clips the fp32 gradients,
                    calls step() once (all groups), copies the fp32 masters to the weights.
                    (Its constructor steps once on zero gradients: see build_engine.)
  ZeRO-1/2          DeepSpeedZeroOptimizer: overflow check (fp16 always; fp32 on an invalid
                    norm; bf16 only if bf16.check_grad_overflow, the default) then, per
                    parameter group, step() with param_groups narrowed to that group, the fp32
                    partition copied into the bit16 partition, all-gather; after the first
                    group's step() it links every weight to its Adam state, once for good.
  ZeRO-1 bf16 with data_types.grad_accum_dtype=fp32: BF16_Optimizer, overflow check on the
                    norm always, one step() on all groups, the same one-time state linking.
  ZeRO-3            DeepSpeedZeroOptimizer_Stage3: overflow check on the norm always, then per
                    sub-group (one per parameter group here) step() on the flat fp32 partition
                    and a copy into the bit16 partition.
  Engine            lr scheduler stepped unless the wrapper reports overflow; skipped_steps and
                    was_step_applied() follow the wrapper's overflow flag; global_steps counts
                    every boundary, skipped or not (as for DeepSpeed's own skips).
So the veto is held for the whole engine.step() (every step() call is a no-op), the copies
back to the weights then copy unchanged masters, and the bookkeeping is put right afterwards.
Frozen units (stagewise training, train/stages.py) use the same fact per group: step() leaves
out the groups of frozen units whichever of these calls it is, and their masters, copied back,
are unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from megatron_style.config import PretrainConfig
from megatron_style.config.objective import UNITS
from megatron_style.train.stages import parameter_unit

# Besides norms and biases (every 1-D parameter), AdamW does not decay what unilm's BEiT,
# BEiT v2 and BEiT-3 code exempt (`no_weight_decay`: the CLS token and the vision position
# table) and, with optim.decay_embeddings false, the text embedding, the text position table
# and the mask token too (which unilm decays).
_NO_DECAY_UNILM = ("cls_token", "pos_vision.weight")
_NO_DECAY_EMBEDDINGS = ("mask_token", "text_embed.weight", "pos_text.weight")


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True,
                 by_unit: bool = False) -> list[dict[str, Any]]:
    """AdamW's groups: "decay" and "no_decay". `by_unit` (a run with stages): each of them
    split further by training unit (train/stages.py), "decay/<unit>" and "no_decay/<unit>"
    with a "unit" key, in UNITS order, empty ones left out, so that SkippableStep can leave a
    frozen unit's groups out of the update."""
    exempt = _NO_DECAY_UNILM + (() if decay_embeddings else _NO_DECAY_EMBEDDINGS)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(exempt):
            no_decay.append((name, p))
        else:
            decay.append((name, p))
    if not by_unit:
        return [{"params": [p for _, p in decay], "weight_decay": weight_decay, "name": "decay"},
                {"params": [p for _, p in no_decay], "weight_decay": 0.0, "name": "no_decay"}]
    groups = []
    for kind, members, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
        by: dict[str, list[nn.Parameter]] = {u: [] for u in UNITS}
        for name, p in members:
            by[parameter_unit(name)].append(p)
        groups += [{"params": ps, "weight_decay": wd, "name": f"{kind}/{u}", "unit": u}
                   for u, ps in by.items() if ps]
    return groups


class SkippableStep:
    """Mixin for an optimizer class: step() does nothing while the update is vetoed.

    The veto is held by `skip_update` for a whole engine.step(): DeepSpeed calls step() once
    per parameter group under ZeRO (our decay and no_decay groups), once in the bf16/fp16
    wrappers, and not at all when it finds an overflow itself, so a one-shot flag either
    covers too little or leaks into the next step.

    It also leaves out the parameter groups of frozen units (`_frozen_units`, set by
    train/stages.Freezer) in every one of those calls; a call on frozen groups only does
    nothing."""

    _update_vetoed = False
    # Units whose parameter groups (key "unit", param_groups(by_unit=True)) step() leaves out:
    # no update, no weight decay, Adam state untouched (train/stages.py's Freezer sets it).
    _frozen_units: frozenset = frozenset()

    def step(self, *args, **kwargs):  # type: ignore[override]
        if self._update_vetoed:
            return None
        frozen = self._frozen_units
        if not frozen:
            return super().step(*args, **kwargs)  # type: ignore[misc]
        # `param_groups` is whatever DeepSpeed set for this call (ZeRO-1/2: the one group it
        # steps; ZeRO-3: all, the others' params []; the wrappers and ZeRO-0: all of them),
        # so narrow what is there and put it back as found.
        groups = self.param_groups
        active = [g for g in groups if g.get("unit") not in frozen]
        if len(active) == len(groups):
            return super().step(*args, **kwargs)  # type: ignore[misc]
        self._zero_state([g for g in groups if g.get("unit") in frozen])
        if not active:
            return None
        self.param_groups = active
        try:
            return super().step(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.param_groups = groups

    def _zero_state(self, groups: list[dict]) -> None:
        """Give the parameters of frozen groups that were never stepped the state AdamW would
        create at their first step (step 0, zero moments). A unit frozen from step 0 otherwise
        has none, and DeepSpeed's universal checkpoint (an elastic resume on another number of
        ranks) cannot convert a group without moments. The values are exactly what AdamW's
        first step starts from, so nothing changes numerically. torch's AdamW only: other
        optimizers keep their own state layout."""
        if not isinstance(self, torch.optim.Adam):
            return
        fused = bool(self.defaults.get("fused")) or bool(self.defaults.get("capturable"))
        for g in groups:
            for p in g["params"]:
                if self.state.get(p):
                    continue
                step = (torch.zeros((), dtype=torch.float32, device=p.device) if fused
                        else torch.tensor(0.0, dtype=torch.float32))
                state = {"step": step, "exp_avg": torch.zeros_like(p),
                         "exp_avg_sq": torch.zeros_like(p)}
                if g.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p)
                self.state[p] = state

    @property
    def skip_next(self) -> bool:
        return False

    @skip_next.setter
    def skip_next(self, value: bool) -> None:
        raise AttributeError(
            "optimizer.skip_next is gone: a one-shot flag covered one of DeepSpeed's per-group "
            "step() calls; veto the update with `with skip_update(engine, skip): engine.step()`")


@contextlib.contextmanager
def skip_update(engine, skip: bool = True) -> Iterator[None]:
    """Veto the optimizer update of the engine.step() run inside, on this rank.

        with skip_update(engine, skip=decision_of_all_ranks):
            engine.step()

    With skip false this does nothing. With skip true the step changes no tensor: weights,
    fp32 masters, Adam moments and step counters stay bit-identical, at every ZeRO stage and
    precision, whether DeepSpeed found an overflow itself or not (fp16's loss scaler may still
    lower its scale: that is its job). The step's gradients are cleared as after any step, the
    engine counts it in skipped_steps and was_step_applied() is False; global_steps counts it,
    as DeepSpeed does for its own skips. The veto ends when the block ends, also on an
    exception. Every rank must take the same decision (the vetoed step still runs DeepSpeed's
    collectives), and the block must hold the engine.step() of an accumulation boundary.
    """
    if not skip:
        yield
        return
    managed = getattr(engine, "managed_gradient_accumulation", lambda: True)()
    if managed and not engine.is_gradient_accumulation_boundary():
        raise RuntimeError("skip_update(engine, True) must hold the engine.step() of a gradient "
                           "accumulation boundary (the last micro-batch of the step); earlier "
                           "engine.step() calls update nothing")
    outer = engine.optimizer
    base = base_optimizer(outer)
    # DeepSpeed links each weight to its Adam state after the first update it runs (ZeRO-1/2,
    # BF16_Optimizer), for good: a vetoed first update would link the weights to empty state.
    linked = getattr(outer, "_hp_optimizer_states_linked", None)
    had_state = {id(k) for k in base.state}
    scheduler = getattr(engine, "lr_scheduler", None)
    engine.lr_scheduler = None  # stepped after an update DeepSpeed saw no overflow in
    base._update_vetoed = True
    try:
        yield
        if getattr(engine, "_step_applied", False):  # DeepSpeed did not skip it by itself
            engine._step_applied = False
            engine.skipped_steps += 1
    finally:
        base._update_vetoed = False
        engine.lr_scheduler = scheduler
        if linked is False:
            outer._hp_optimizer_states_linked = False
        for k in [k for k, v in base.state.items() if id(k) not in had_state and not v]:
            del base.state[k]  # empty entries the narrowed per-group lookups created


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
    # A run with stages splits the groups by unit, for all of its stages alike (the optimizer
    # state of a checkpoint has one layout throughout the run); without, the two groups.
    groups = param_groups(model, o.weight_decay, o.decay_embeddings, by_unit=bool(cfg.stages))
    return cls(groups, lr=o.lr,
               betas=tuple(o.betas), eps=o.eps, **extra)


def deepspeed_config(cfg: PretrainConfig, grad_accum: Optional[int] = None) -> dict[str, Any]:
    """`grad_accum`: micro-batches per step on each rank, as the run's batch plan derived it
    (train/batch_plan.py); default parallel.grad_accum."""
    p = cfg.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    ds: dict[str, Any] = {
        # One DeepSpeed "sample" is one packed micro-batch of data.micro_batch_size samples.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": p.grad_accum if grad_accum is None else grad_accum,
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


def build_engine(model: nn.Module, cfg: PretrainConfig, device: torch.device, mpu: Optional[Any] = None,
                 grad_accum: Optional[int] = None):
    import deepspeed

    if cfg.parallel.zero_stage == 3:
        # The blocks apply their sub-modules' weights themselves (grouped ops): tell ZeRO-3
        # which module needs which parameters, so it gathers them per block for forward and
        # backward (megatron_style/train/zero3.py).
        from megatron_style.train.zero3 import register_zero3_parameters
        register_zero3_parameters(model, model.beit3.layers)
    optimizer = build_optimizer(model, cfg, device)
    # DeepSpeed's bf16/fp16 wrappers at ZeRO-0 (FP16_Optimizer, FP16_UnfusedOptimizer) "create
    # the optimizer state" by stepping it once on zero gradients: AdamW then decays the fp32
    # masters but not the weights, and counts an Adam step nobody took, so the masters no
    # longer match the weights until the first update (a vetoed one would copy them over).
    # Vetoed here, Adam's state comes from the first real update, as at every other stage.
    base = optimizer
    base._update_vetoed = True
    try:
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=base,
                                                       config=deepspeed_config(cfg, grad_accum),
                                                       mpu=mpu)
    finally:
        base._update_vetoed = False
    return engine, optimizer


def base_optimizer(optimizer) -> SkippableStep:
    """The wrapped torch optimizer inside DeepSpeed's ZeRO / mixed-precision wrapper (or the
    engine's optimizer itself at ZeRO-0 fp32)."""
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
