"""Every rule that relates two or more config fields, in one place.

Single-field ranges are declared on the fields (fields.py) and checked first; the rules here
run after them, from `PretrainConfig.validate()`, which `load_config` calls before any process
group starts. A broken rule raises ConfigError naming the key to change. Checks that need the
files a run names (shards, tokenizers, checkpoints) are made by the entry point right after
(train/preflight.py), still before any process starts waiting on another.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from megatron_style.config.errors import ConfigError, check

if TYPE_CHECKING:  # the sections import this module: their types are for annotations only
    from megatron_style.config.data import DataConfig
    from megatron_style.config.model import ModelConfig
    from megatron_style.config.pretrain import PretrainConfig
    from megatron_style.config.train import OptimConfig, ParallelConfig

_STREAMS = ("image", "text", "pair")


def check_model(m: "ModelConfig", key: str = "model") -> None:
    check(m.dim % m.heads == 0, f"{key}.heads", f"dim {m.dim} must be divisible by heads {m.heads}")
    check(m.img_size % m.patch_size == 0, f"{key}.patch_size",
          f"img_size {m.img_size} must be a multiple of patch_size {m.patch_size}")
    check(m.vl_layers <= m.layers, f"{key}.vl_layers",
          f"must be in [0, layers={m.layers}], got {m.vl_layers}")
    check(not (m.attention == "decoupled" and m.vl_layers > 0), f"{key}.vl_layers",
          "the decoupled layout (released checkpoints) has no VL expert; use 0 or "
          "attention: shared")


def check_data(d: "DataConfig", key: str = "data") -> None:
    weights = {s: getattr(d, s).weight for s in _STREAMS}
    check(sum(weights.values()) > 0, f"{key}.<stream>.weight",
          "at least one of image/text/pair needs a weight > 0")
    if d.source == "shards":
        for s in _STREAMS:
            st = getattr(d, s)
            check(st.weight == 0 or bool(st.shards), f"{key}.{s}.shards",
                  f"stream {s!r} has weight {st.weight} but no shards; give a brace "
                  "pattern, directory or list file, or set its weight to 0")
    counts = d.stream_counts()
    starved = [s for s in _STREAMS if weights[s] > 0 and counts[s] == 0]
    if starved:
        raise ConfigError(
            f"{key}.micro_batch_size: {d.micro_batch_size} samples split by the stream weights "
            f"{weights} give stream {starved[0]!r} no sample in any micro-batch (split "
            f"{counts}); raise micro_batch_size or set {key}.{starved[0]}.weight: 0")
    if d.global_batch_size:
        check(d.global_batch_size % d.micro_batch_size == 0, f"{key}.global_batch_size",
              f"{d.global_batch_size} is not a multiple of {key}.micro_batch_size="
              f"{d.micro_batch_size}; every step is whole micro-batches")
    lo_hi = d.crop_scale
    check(len(lo_hi) == 2 and lo_hi[0] <= lo_hi[1], f"{key}.crop_scale",
          f"must be [lo, hi] with 0 < lo <= hi <= 1, got {lo_hi}")
    check(d.loader_timeout_s == 0 or d.loader_timeout_s > d.read_timeout_s,
          f"{key}.loader_timeout_s", f"must be 0 (off) or more than {key}.read_timeout_s="
          f"{d.read_timeout_s}, got {d.loader_timeout_s}")
    tok = d.tokenizer
    check(tok.visual != "vqkd" or bool(tok.visual_model), f"{key}.tokenizer.visual_model",
          "visual: vqkd needs the path of a VQ-KD checkpoint (BEiT v2's "
          "vqkd_encoder_base_decoder_*.pth)")


def check_optim(o: "OptimConfig", key: str = "optim") -> None:
    check(len(o.betas) == 2, f"{key}.betas", f"must be two numbers in [0, 1), got {o.betas}")


def check_parallel(p: "ParallelConfig", key: str = "parallel") -> None:
    """The DeepSpeed file and entries must not contradict what the recipe says."""
    check(not p.deepspeed_file or os.path.isfile(p.deepspeed_file), f"{key}.deepspeed_file",
          f"{p.deepspeed_file!r} does not exist")
    extra = dict(p.deepspeed)
    if p.deepspeed_file:
        try:
            with open(p.deepspeed_file) as f:
                extra.update(json.load(f))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}.deepspeed_file: {p.deepspeed_file!r} is not valid JSON: "
                              f"{e}") from None
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        check(k not in extra, f"{key}.deepspeed", f"{k!r} is set by the trainer from "
              "data.micro_batch_size and data.global_batch_size (or parallel.grad_accum); "
              "remove it")
    stage = extra.get("zero_optimization", {}).get("stage", p.zero_stage)
    check(stage == p.zero_stage, f"{key}.zero_stage",
          f"is {p.zero_stage} but the DeepSpeed config says stage {stage}; make them agree")
    for prec in ("bf16", "fp16"):
        on = extra.get(prec, {}).get("enabled")
        check(on is None or on == (p.precision == prec), f"{key}.precision",
              f"is {p.precision!r} but the DeepSpeed config has {prec}.enabled={on}")


def check_tensor_parallel(m: "ModelConfig", tensor: int, key: str = "parallel.tensor") -> None:
    """The tensor-parallel degree must split the heads and the FFN width evenly."""
    check(tensor >= 1, key, f"tensor-parallel size {tensor}: must be >= 1")
    for name in ("heads", "ffn_dim"):
        check(getattr(m, name) % tensor == 0, key, f"tensor-parallel size {tensor} does not "
              f"divide model.{name} = {getattr(m, name)}")


def _stage_streams(cfg: "PretrainConfig", stage) -> "DataConfig":
    import dataclasses
    d = cfg.data
    if stage is None or not stage.streams:
        return d
    return dataclasses.replace(d, **{s: dataclasses.replace(getattr(d, s), weight=float(w))
                                     for s, w in stage.streams.items()})


ITC_BATCHES = ("micro", "step")


def check_objective(cfg: "PretrainConfig", obj, data: "DataConfig", key: str) -> None:
    """The objectives of a run (or a stage) against its streams and model."""
    check(sum((obj.mdm, obj.itc, obj.itm)) > 0, key,
          "every objective weight is 0: set at least one of mdm, itc, itm above 0")
    check(obj.itc_batch in ITC_BATCHES, f"{key}.itc_batch",
          f"{obj.itc_batch!r} is not one of {', '.join(map(repr, ITC_BATCHES))} (whose pairs are "
          "ITC's negatives: the micro-batch's, or the whole step's)")
    pairs = data.stream_counts()["pair"]
    for name in ("itc", "itm"):
        if getattr(obj, name) > 0:
            check(pairs > 0, f"{key}.{name}", f"{name} learns from image-text pairs, but the "
                  f"pair stream has no sample in a micro-batch (split {data.stream_counts()}); "
                  "give data.pair (or the stage's streams) a weight > 0")
    if obj.itm > 0:
        check(obj.itc > 0, f"{key}.itm", "itm draws its hard negatives from the ITC "
              "similarities (VLMo, ALBEF): give itc a weight > 0 too")
        check(cfg.model.vl_layers > 0, f"{key}.itm", "itm runs on the fusion path, the VL "
              f"experts of the top layers, but model.vl_layers is 0 "
              f"(attention {cfg.model.attention!r}); use attention: shared and vl_layers > 0")


def check_stages(cfg: "PretrainConfig") -> None:
    from megatron_style.config.fields import check_bounds
    from megatron_style.config.objective import UNITS
    if not cfg.stages:
        return
    total = 0
    for i, st in enumerate(cfg.stages):
        key = f"stages[{i}]"
        check_bounds(st, key)
        for s, w in st.streams.items():
            check(s in _STREAMS, f"{key}.streams.{s}",
                  f"unknown stream; a stage weights {', '.join(_STREAMS)}")
            check(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0,
                  f"{key}.streams.{s}", f"must be a number >= 0, got {w!r}")
        data = _stage_streams(cfg, st)
        try:
            check_data(data, f"{key}.streams")
        except ConfigError as e:
            raise ConfigError(f"{e} (in stage {i} {st.name!r})") from None
        if st.objective is not None:
            check_bounds(st.objective, f"{key}.objective")
        check_objective(cfg, st.objective or cfg.objective, data, f"{key}.objective")
        check(bool(st.train), f"{key}.train", "names no parameter unit; use [all] or some of "
              + ", ".join(UNITS))
        for u in st.train:
            check(u == "all" or u in UNITS, f"{key}.train",
                  f"unknown parameter unit {u!r}; accepted: all, {', '.join(UNITS)}")
        check(st.warmup_steps == 0 or st.lr > 0, f"{key}.warmup_steps",
              "belongs to the stage's own schedule, which needs the stage's lr > 0")
        total += st.steps
    check(total == cfg.steps, "stages", f"the stages' steps add up to {total} but the run has "
          f"steps={cfg.steps}; make them agree")


def check_run(cfg: "PretrainConfig") -> None:
    """Every rule of every section, then the rules between sections."""
    check_model(cfg.model)
    check_data(cfg.data)
    check_optim(cfg.optim)
    check_parallel(cfg.parallel)
    check_tensor_parallel(cfg.model, cfg.parallel.tensor)
    check(not (cfg.data.global_batch_size and cfg.parallel.grad_accum != 1), "parallel.grad_accum",
          f"is derived from data.global_batch_size={cfg.data.global_batch_size} for the number "
          f"of ranks a run starts on; remove grad_accum={cfg.parallel.grad_accum}, or set "
          "data.global_batch_size: 0 to give the accumulation yourself")
    if cfg.stages:
        check_stages(cfg)
    else:
        check_objective(cfg, cfg.objective, cfg.data, "objective")
    pixels_model = cfg.model.visual_target == "pixels"
    pixels_data = cfg.data.tokenizer.visual == "pixels"
    check(pixels_model == pixels_data, "data.tokenizer.visual",
          f"{cfg.data.tokenizer.visual!r} does not match model.visual_target "
          f"{cfg.model.visual_target!r}; use visual: pixels with visual_target: pixels, and "
          "kmeans or vqkd with visual_target: tokens")
