"""Stagewise training (VLMo): which unit each parameter belongs to, the stage plan, freezing.

    plan = StagePlan(cfg)                 # cfg.stages, or one implicit stage over cfg.steps
    freezer = Freezer(model, engine.optimizer)
    for step in range(start, cfg.steps):
        stage = plan.at(step)             # loader: StagePlan.data_config(stage) at its start
        freezer.apply(stage)              # before the step's first micro-batch
        set_learning_rate(engine.optimizer, plan.learning_rate(step))
        ... forward / backward per micro-batch, engine.step()

What "frozen" means, at every ZeRO stage (0-3) and precision: a frozen parameter gets a zero
gradient (so it adds nothing to the norm that clipping uses and nothing reaches Adam), no
optimizer update and no weight decay; its fp32 master and Adam state (moments, step count)
stay bit-identical. Two mechanisms, because DeepSpeed owns the path in between:

  * gradients: a tensor hook on every parameter, registered once, returns zeros while the
    parameter's unit is frozen. Tensor hooks run before the gradient is accumulated into
    `.grad`, so DeepSpeed's own hooks (post-accumulate, ZeRO-1/2/3 and BF16_Optimizer) only
    ever see the zeros. requires_grad is left alone: DeepSpeed partitions the parameters and
    registers its hooks once, at start-up, and changing it later fights them.
  * the update: every parameter stays in the optimizer, whose groups are split per unit
    (engine.param_groups, "decay/<unit>" and "no_decay/<unit>" with a "unit" key) when the run
    has stages; SkippableStep.step() leaves out the groups of frozen units. DeepSpeed keeps
    those group dicts (ZeRO-1/2 narrow `param_groups` to one of them per step() call, ZeRO-3
    sets each one's params to its flat fp32 partition, the bf16/fp16 wrappers replace their
    params in place), so the "unit" key is there in every step() call.

The frozen parameters' backward is still computed (their gradients are then dropped): the
saving of freezing is in the optimizer, not in backward.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from megatron_style.batch import LANGUAGE, VISION, VL
from megatron_style.config import STREAMS, PretrainConfig
from megatron_style.config.objective import UNITS, ObjectiveConfig
from megatron_style.train.schedule import learning_rate as run_learning_rate

# Added to data.seed (times the stage's index) for the loader of every stage after the first,
# so each stage reads its streams in its own shuffle rather than replaying stage 0's order.
# A large prime: seed s of stage k never equals the seed s' of stage 0 of a nearby run.
STAGE_SEED_SALT = 1_000_003

_EXPERT_UNITS = {VISION: "vision_ffn", LANGUAGE: "language_ffn", VL: "vl_ffn"}
_FINAL_NORM_UNITS = {VISION: "vision_head", LANGUAGE: "language_head"}
# Wrappers whose name prefixes the model's own parameter names: DeepSpeed's engine
# ("module."), torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ---- parameter units -----------------------------------------------------------------------
def parameter_unit(name: str) -> str:
    """The unit (config.objective.UNITS) of a MaskedDataModel parameter (also `itc.*`, the
    ContrastiveHeads, and `itm.*`, the matching head), named as model.named_parameters() names
    it, with or without a wrapper's "module." in front. Both attention layouts and tensor-
    parallel shards have the same names. Any other name raises ValueError: a parameter added
    to the model must be given a unit here rather than escape freezing."""
    bare = name
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if bare.startswith(prefix):
                bare, stripped = bare[len(prefix):], True
    parts = bare.split(".")
    unit = _unit_of(parts)
    if unit is None:
        raise ValueError(f"parameter {name!r} belongs to no training unit; give it one in "
                         f"megatron_style/train/stages.py (units: {', '.join(UNITS)})")
    return unit


def _unit_of(parts: list[str]) -> Optional[str]:
    head = parts[0]
    if head in ("itc", "itm") and len(parts) > 1:
        return head
    if head == "text_head" and len(parts) > 1:
        return "language_head"
    if head == "image_head" and len(parts) > 1:
        return "vision_head"
    if head != "beit3" or len(parts) < 3:
        return None
    part = parts[1]
    if part in ("vision_embed", "pos_vision"):
        return "vision_embed"
    if part in ("text_embed", "pos_text"):
        return "text_embed"
    if part == "final_norm" and parts[2].isdigit():
        return _FINAL_NORM_UNITS.get(int(parts[2]))
    if part == "layers" and len(parts) >= 5 and parts[2].isdigit():
        # beit3.layers.N.attn.*: attention, with its norms, whatever the layout (shared: one
        # set of projections; decoupled: one per modality); beit3.layers.N.ffn.experts.E.*.
        if parts[3] == "attn":
            return "attention"
        if parts[3] == "ffn" and parts[4] == "experts" and len(parts) >= 7 and parts[5].isdigit():
            return _EXPERT_UNITS.get(int(parts[5]))
    return None


# ---- the plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One stage: optimizer steps start .. end-1 (`start` steps completed before it, `end`
    after it), its stream weights, objective weights, the units it trains, and its own
    learning rate (lr > 0: warmup + cosine over the stage; 0: the run's schedule goes on)."""

    index: int
    name: str
    start: int
    end: int
    streams: dict[str, float]
    objective: ObjectiveConfig
    train: frozenset[str]
    lr: float = 0.0
    warmup_steps: int = 0

    @property
    def steps(self) -> int:
        return self.end - self.start

    @property
    def frozen(self) -> frozenset[str]:
        return frozenset(UNITS) - self.train


class StagePlan:
    """The run's stages (cfg.stages; checked by config.checks.check_stages), or, without
    any, one implicit stage over cfg.steps that trains every unit with the data section's
    streams and cfg.objective (the behaviour of a run without stages)."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        if not cfg.stages:
            self.stages: tuple[Stage, ...] = (
                Stage(0, "all", 0, cfg.steps, cfg.data.stream_weights(), cfg.objective,
                      frozenset(UNITS)),)
            return
        stages, start = [], 0
        for i, st in enumerate(cfg.stages):
            streams = {s: float(st.streams.get(s, getattr(cfg.data, s).weight)) for s in STREAMS}
            train = frozenset(UNITS) if "all" in st.train else frozenset(st.train)
            stages.append(Stage(i, st.name or f"stage{i}", start, start + st.steps, streams,
                                st.objective or cfg.objective, train, float(st.lr),
                                int(st.warmup_steps)))
            start += st.steps
        if start != cfg.steps:  # config.checks.check_stages says so at load already
            raise ValueError(f"the stages' steps add up to {start}, the run has {cfg.steps}")
        self.stages = tuple(stages)

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Completed-step counts at which a new stage begins (every stage's start but 0)."""
        return tuple(s.start for s in self.stages[1:])

    def at(self, step: int) -> Stage:
        """The stage that runs the optimizer step after `step` completed steps; at
        step >= cfg.steps (the run is over; a checkpoint of a run that was given more steps
        may be past the end, and the trainer then says there is nothing to train) the last."""
        if step < 0:
            raise ValueError(f"step {step} is outside the run's 0..{self.cfg.steps}")
        for s in self.stages:
            if step < s.end:
                return s
        return self.stages[-1]

    def data_config(self, stage: Stage) -> PretrainConfig:
        """A copy of the run's config for the loader of `stage`: the stage's stream weights,
        and data.seed salted for every stage after the first so that each stage reads its
        streams with a shuffle of its own (stage 0 keeps data.seed)."""
        d = self.cfg.data
        streams = {s: dataclasses.replace(getattr(d, s), weight=w) for s, w in stage.streams.items()
                   if getattr(d, s).weight != w}
        seed = d.seed + STAGE_SEED_SALT * stage.index
        return dataclasses.replace(self.cfg, data=dataclasses.replace(d, seed=seed, **streams))

    def learning_rate(self, step: int) -> float:
        """LR of the optimizer step after `step` completed steps: the run's schedule
        (schedule.learning_rate over cfg.steps), or, in a stage with lr > 0, warmup + cosine
        of the stage's own over its steps (min_lr_ratio from optim)."""
        st = self.at(step)
        if st.lr <= 0:
            return run_learning_rate(step, self.cfg.steps, self.cfg.optim)
        own = dataclasses.replace(self.cfg.optim, lr=st.lr, warmup_steps=st.warmup_steps)
        return run_learning_rate(step - st.start, st.steps, own)

    def describe(self) -> str:
        """One line per stage, for the start-up log."""
        lines = []
        for s in self.stages:
            streams = " ".join(f"{k}={v:g}" for k, v in s.streams.items())
            obj = " ".join(f"{n}={getattr(s.objective, n):g}" for n in s.objective.active())
            trains = "all" if not s.frozen else ",".join(u for u in UNITS if u in s.train)
            lr = (f"own lr {s.lr:g} (warmup {s.warmup_steps})" if s.lr > 0
                  else "the run's lr schedule")
            lines.append(f"stage {s.index + 1}/{len(self.stages)} {s.name!r}: steps "
                         f"{s.start + 1}-{s.end} ({s.steps}); streams {streams}; objective "
                         f"{obj}; trains {trains}; {lr}")
        return "\n".join(lines)


# ---- freezing ------------------------------------------------------------------------------
def _stepper(optimizer):
    """The SkippableStep inside DeepSpeed's wrapper (engine.base_optimizer's search, by the
    attribute it declares: engine.py imports this module, so this one cannot import it)."""
    seen = optimizer
    for _ in range(4):
        if hasattr(type(seen), "_frozen_units"):
            return seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    raise RuntimeError(f"no SkippableStep optimizer inside {type(optimizer).__name__}: build "
                       "it with megatron_style.train.engine.build_optimizer / build_engine")


class Freezer:
    """Freezes the units a stage does not train (the module docstring says what that means).

    `model`: the module whose parameters the optimizer holds (the engine's module, or the
    model before deepspeed.initialize: the same parameters); `optimizer`: engine.optimizer
    (or the SkippableStep optimizer itself). Construct it once per model: the gradient hooks
    are registered here, once. apply() is cheap, call it before every step's micro-batches
    (the hooks act in backward, the optimizer part in engine.step())."""

    def __init__(self, model: nn.Module, optimizer):
        if getattr(model, "_stage_freezer", None) is not None:
            raise RuntimeError("this model has a Freezer already: two would register the "
                               "gradient hooks twice and disagree on what is frozen")
        self._model = model
        self._optimizer = _stepper(optimizer)
        self._by_unit = all("unit" in g for g in self._optimizer.param_groups)
        self._frozen: frozenset[str] = frozenset()
        self._handles = []
        for name, p in model.named_parameters():
            unit = parameter_unit(name)  # raises on a parameter without a unit
            if p.requires_grad:
                self._handles.append(p.register_hook(self._hook(unit)))
        model._stage_freezer = self

    def _hook(self, unit: str) -> Callable[[torch.Tensor], Optional[torch.Tensor]]:
        def zero_if_frozen(grad: torch.Tensor) -> Optional[torch.Tensor]:
            # Zeros, not grad * 0: a non-finite gradient of a frozen part must not turn into
            # NaN and count as an overflow of the parts being trained.
            return torch.zeros_like(grad) if unit in self._frozen else None
        return zero_if_frozen

    @property
    def frozen(self) -> frozenset[str]:
        return self._frozen

    def apply(self, stage: Stage) -> None:
        frozen = stage.frozen
        if frozen == self._frozen:
            return
        if frozen and not self._by_unit:
            raise RuntimeError(
                f"stage {stage.name!r} freezes {', '.join(sorted(frozen))} but the optimizer's "
                "parameter groups are not split by unit; build it with cfg.stages set "
                "(engine.build_optimizer splits them then)")
        self._frozen = frozen
        self._optimizer._frozen_units = frozen

    def close(self) -> None:
        """Remove the hooks and unfreeze everything (the model can take another Freezer)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._frozen = frozenset()
        self._optimizer._frozen_units = frozenset()
        self._model._stage_freezer = None
