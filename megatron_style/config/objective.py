"""What a run learns: the objectives and their weights, training stages, periodic validation.

    objective: {mdm: 1.0, itc: 0.0, itm: 0.0}     # BEiT-3: masked data modeling alone
    objective: {mdm: 1.0, itc: 1.0, itm: 1.0}     # VLMo: MLM (+ MIM) + ITC + ITM
    objective: {mdm: 0.0, itc: 1.0}               # BEiT-3's ITC intermediate tuning

The loss of a micro-batch is the weighted sum of the active objectives' losses. ITC and ITM are
computed on the micro-batch's image-text pairs (model/contrastive.py, model/matching.py).

`stages:` splits a run into consecutive stages (VLMo's stagewise pretraining): each has a step
count, stream weights, objective weights and the parameter units it trains; the rest are frozen
(train/stages.py says exactly what frozen means).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_style.config.fields import bounded

#: Parameter units a stage trains or freezes (train/stages.py maps parameter names to them).
UNITS: tuple[str, ...] = ("attention", "vision_ffn", "language_ffn", "vl_ffn", "vision_embed",
                          "text_embed", "vision_head", "language_head", "itc", "itm")


@dataclass
class ObjectiveConfig:
    # Masked data modeling (BEiT-3): masked text tokens of texts and pairs, masked patches.
    mdm: float = bounded(1.0, ge=0)
    # Image-text contrastive (BEiT-3's retrieval tuning, VLMo, CLIP): the pairs' images and
    # texts encoded apart, symmetric InfoNCE over every data-parallel rank's pairs.
    itc: float = bounded(0.0, ge=0)
    # Image-text matching (VLMo, ALBEF): each pair, one hard negative text and one hard
    # negative image drawn from the ITC similarities, classified match / no match on the
    # fusion path (the VL experts of the top model.vl_layers).
    itm: float = bounded(0.0, ge=0)
    # Whose pairs are ITC's negatives and ITM's candidates. "micro": the micro-batch's pairs
    # of every data-parallel rank (gradient accumulation adds none). "step": every
    # micro-batch of the step on every rank, so the contrastive batch is the global batch
    # whatever the accumulation: the step's ITC features are computed first without
    # gradient, then each micro-batch recomputes its own with gradient against the rest
    # (gradient caching, as open_clip's accum_freq; one extra forward of the pairs' views per
    # micro-batch). The gradient is that of one contrastive batch of the whole step
    # (tests/parallel/test_itc_step_pool.py).
    itc_batch: str = "micro"

    def active(self) -> tuple[str, ...]:
        return tuple(n for n in ("mdm", "itc", "itm") if getattr(self, n) > 0)


@dataclass
class StageConfig:
    """One stage of a stagewise run (VLMo: images, then texts, then pairs)."""

    name: str = ""
    steps: int = bounded(1, ge=1)
    # Stream weights in this stage, e.g. {image: 1, text: 0, pair: 0}; a stream not named keeps
    # the data section's weight.
    streams: dict[str, float] = field(default_factory=dict)
    # Objective weights in this stage; null = the run's `objective`.
    objective: Optional[ObjectiveConfig] = None
    # Parameter units trained in this stage (UNITS), or ["all"]; every other unit is frozen.
    train: list[str] = field(default_factory=lambda: ["all"])
    # The stage's own learning-rate schedule (warmup then cosine over its steps), as VLMo trains
    # each stage as a run of its own; 0 = the run's schedule (optim) goes on across stages.
    lr: float = bounded(0.0, ge=0, note="0 = the run's schedule")
    warmup_steps: int = bounded(0, ge=0)


@dataclass
class EvalConfig:
    """Validation while training: a fixed held-out set, fixed masks, every `every_steps`."""

    every_steps: int = bounded(0, ge=0, note="0 = no periodic validation")
    # Held-out samples per stream (image, text, pair) per validation; bounds its cost.
    samples: int = bounded(256, ge=1)
    # Held-out shards per stream (the same patterns as data.<stream>.shards); empty with the
    # demo source: the demo's held-out scenes. A stream without shards is not validated.
    image_shards: str = ""
    text_shards: str = ""
    pair_shards: str = ""
    # Seed of the validation masks (fixed: the same samples, masks and numbers at every
    # validation of the same weights, resumed or not).
    seed: int = 4321


def run_objectives(cfg) -> tuple[str, ...]:
    """Every objective ("mdm", "itc", "itm") that any stage (or the run) gives a weight > 0."""
    objectives = [st.objective or cfg.objective for st in cfg.stages] or [cfg.objective]
    return tuple(n for n in ("mdm", "itc", "itm") if any(getattr(o, n) > 0 for o in objectives))


def model_heads(cfg) -> tuple[str, ...]:
    """The optional heads a run's model holds ("itc", "itm"): those of every objective that
    any stage (or the run) gives a weight > 0. Fixed for the whole run, so that a checkpoint
    holds the same tensors before and after a stage boundary."""
    return tuple(h for h in run_objectives(cfg) if h != "mdm")
