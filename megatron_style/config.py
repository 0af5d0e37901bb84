"""Configuration: one dataclass per component, presets, and a strict YAML/JSON loader.

A run is described by one file (`configs/pretrain/*.yaml`) plus `key.sub=value` overrides on
the command line. Everything is checked here, before any process group starts: an unknown key
or a bad value raises `ConfigError` naming the key and what would be accepted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration key has a bad value, or does not exist."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

AttentionLayout = Literal["shared", "decoupled"]

#: Sizes named once. `configs/model/*.yaml` are dumps of these (a test keeps them in sync).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # For tests and the CPU demo: a forward pass in milliseconds. Shared attention and one
    # VL layer so that every code path of the giant is exercised.
    "tiny": dict(layers=2, dim=64, ffn_dim=256, heads=4, patch_size=8, img_size=32,
                 attention="shared", vl_layers=1, text_vocab_size=1000, visual_vocab_size=256,
                 max_text_len=64),
    # The released checkpoints (microsoft/unilm beit3): per-modality attention, no VL expert.
    "base": dict(layers=12, dim=768, ffn_dim=3072, heads=12, patch_size=16, img_size=224,
                 attention="decoupled", vl_layers=0, text_vocab_size=64010,
                 visual_vocab_size=8192, max_text_len=1022),
    "large": dict(layers=24, dim=1024, ffn_dim=4096, heads=16, patch_size=16, img_size=224,
                  attention="decoupled", vl_layers=0, text_vocab_size=64010,
                  visual_vocab_size=8192, max_text_len=1022),
    # The paper's 1.9B model (arXiv 2208.10442, Table 1): shared attention, VL experts on top.
    "giant": dict(layers=40, dim=1408, ffn_dim=6144, heads=16, patch_size=14, img_size=224,
                  attention="shared", vl_layers=3, text_vocab_size=64010,
                  visual_vocab_size=8192, max_text_len=1022),
}


@dataclass
class ModelConfig:
    """Sizes and options of the Multiway Transformer."""

    preset: Optional[str] = None
    layers: int = 2
    dim: int = 64
    ffn_dim: int = 256
    heads: int = 4
    patch_size: int = 8
    img_size: int = 32
    in_chans: int = 3
    attention: AttentionLayout = "shared"
    vl_layers: int = 0
    text_vocab_size: int = 1000
    visual_vocab_size: int = 256
    # Longest text (tokens). The text position table has max_text_len + 2 rows: positions count
    # from 2 as in fairseq, so that released checkpoints (1024 rows) load unchanged.
    max_text_len: int = 64
    drop_path: float = 0.0
    ln_eps: float = 1e-5
    init_std: float = 0.02
    # What the image head predicts: visual-token ids ("tokens", BEiT) or normalised pixels of
    # each masked patch ("pixels", MAE-style regression).
    visual_target: Literal["tokens", "pixels"] = "tokens"
    # Kernel dispatch: "auto" uses Triton on CUDA when available, "reference" forces PyTorch.
    kernels: Literal["auto", "triton", "reference"] = "auto"

    # derived sizes -----------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def image_tokens(self) -> int:
        """Tokens per image in the stream: CLS + patches."""
        return self.num_patches + 1

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_chans

    def has_vl_expert(self, layer: int) -> bool:
        return layer >= self.layers - self.vl_layers

    def validate(self, key: str = "model") -> None:
        for name in ("layers", "dim", "ffn_dim", "heads", "patch_size", "img_size", "in_chans",
                     "text_vocab_size", "visual_vocab_size", "max_text_len"):
            _check(getattr(self, name) > 0, f"{key}.{name}",
                   f"must be a positive integer, got {getattr(self, name)!r}")
        _check(self.dim % self.heads == 0, f"{key}.heads",
               f"dim {self.dim} must be divisible by heads {self.heads}")
        _check(self.img_size % self.patch_size == 0, f"{key}.patch_size",
               f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        _check(0 <= self.vl_layers <= self.layers, f"{key}.vl_layers",
               f"must be in [0, layers={self.layers}], got {self.vl_layers}")
        _check(not (self.attention == "decoupled" and self.vl_layers > 0), f"{key}.vl_layers",
               "the decoupled layout (released checkpoints) has no VL expert; use 0 or "
               "attention: shared")
        _check(0.0 <= self.drop_path < 1.0, f"{key}.drop_path",
               f"must be in [0, 1), got {self.drop_path}")
        _check(self.ln_eps > 0, f"{key}.ln_eps", f"must be > 0, got {self.ln_eps}")
        _check(self.init_std > 0, f"{key}.init_std", f"must be > 0, got {self.init_std}")


def model_config(preset: Optional[str] = None, **overrides: Any) -> ModelConfig:
    """Build a validated ModelConfig from a preset name plus explicit field overrides."""
    data: dict[str, Any] = {}
    if preset is not None:
        data["preset"] = preset
    data.update(overrides)
    cfg = from_dict(ModelConfig, _expand_preset(data, "model"), "model")
    cfg.validate("model")
    return cfg


def _expand_preset(data: dict[str, Any], key: str) -> dict[str, Any]:
    preset = data.get("preset")
    if preset is None:
        return data
    _check(isinstance(preset, str) and preset in MODEL_PRESETS, f"{key}.preset",
           f"unknown preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    return {**MODEL_PRESETS[preset], **data}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

StreamName = Literal["image", "text", "pair"]
STREAMS: tuple[str, ...] = ("image", "text", "pair")


@dataclass
class StreamConfig:
    """One stream of samples: where its shards are and how much of each batch it gets."""

    # Brace pattern ("/data/laion/{00000..00999}.tar"), a directory of .tar files, a text file
    # listing shards one per line, or a list of any of these. Empty with source "demo".
    shards: Union[str, list[str]] = ""
    weight: float = 1.0
    # Horizontal flips change the meaning of "left of" in captions: off for pairs by default.
    flip: bool = True


@dataclass
class MaskingConfig:
    """Masked data modeling: what fraction of each stream is hidden (paper: 15 / 50 / 40 %)."""

    text_ratio: float = 0.15
    pair_text_ratio: float = 0.5
    image_ratio: float = 0.4
    # BEiT block-wise masking: blocks of at least this many patches, aspect ratio in
    # [min_aspect, 1/min_aspect].
    image_min_block: int = 16
    image_min_aspect: float = 0.3

    def validate(self, key: str) -> None:
        for name in ("text_ratio", "pair_text_ratio", "image_ratio"):
            v = getattr(self, name)
            _check(0.0 < v < 1.0, f"{key}.{name}", f"must be in (0, 1), got {v}")
        _check(self.image_min_block >= 1, f"{key}.image_min_block",
               f"must be >= 1, got {self.image_min_block}")
        _check(0.0 < self.image_min_aspect <= 1.0, f"{key}.image_min_aspect",
               f"must be in (0, 1], got {self.image_min_aspect}")


@dataclass
class TokenizerConfig:
    # Text: a SentencePiece model file; empty = train one on the demo corpus (cached).
    text_model: str = ""
    # Visual: "kmeans" (fast patch k-means, trains on CPU), "vqkd" (BEiT v2's VQ-KD, needs
    # `visual_model`), or "pixels" (no tokenizer: MAE-style pixel regression targets).
    visual: Literal["kmeans", "vqkd", "pixels"] = "kmeans"
    visual_model: str = ""
    cache_dir: str = "~/.cache/megatron_style"
    # Text ids: "xlmr" = HF XLMRobertaTokenizer's fairseq scheme of the released beit3.spm
    # (<s>=0 <pad>=1 </s>=2 <unk>=3, pieces shifted by 1, <mask> last); "spm" = the model's own
    # ids with <mask> appended; "auto" = xlmr when the model is laid out like XLM-R's.
    text_id_scheme: Literal["auto", "xlmr", "spm"] = "auto"
    # Demo data only: size of the SentencePiece model and number of generated images the
    # k-means visual tokenizer is trained on (both trained at first use, then cached).
    demo_text_vocab_size: int = 256
    demo_kmeans_images: int = 1000

    def validate(self, key: str) -> None:
        _check(self.visual != "vqkd" or bool(self.visual_model), f"{key}.visual_model",
               "visual: vqkd needs the path of a VQ-KD checkpoint (BEiT v2's "
               "vqkd_encoder_base_decoder_*.pth)")
        _check(self.demo_text_vocab_size >= 64, f"{key}.demo_text_vocab_size",
               f"must be >= 64, got {self.demo_text_vocab_size}")
        _check(self.demo_kmeans_images >= 1, f"{key}.demo_kmeans_images",
               f"must be >= 1, got {self.demo_kmeans_images}")


@dataclass
class DataConfig:
    # "demo": the procedural shapes-and-captions generator; "shards": webdataset tar shards;
    # "synthetic": random tensors with random targets (throughput and memory measurements).
    source: Literal["demo", "shards", "synthetic"] = "demo"
    # Text length of synthetic texts and pairs (tokens).
    synthetic_text_len: int = 64
    image: StreamConfig = field(default_factory=StreamConfig)
    text: StreamConfig = field(default_factory=StreamConfig)
    pair: StreamConfig = field(default_factory=lambda: StreamConfig(flip=False))
    # Samples per micro-batch on each rank, split over the streams by their weights.
    micro_batch_size: int = 24
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    num_workers: int = 2
    # Samples are shuffled in windows of this many per loader worker and stream (1 or 0: in
    # shard order); the windows make the reader's position exactly resumable.
    shuffle_buffer: int = 1000
    # Shards: false = epochs (every sample once per epoch, shard order reshuffled each epoch);
    # true = each loader worker draws shards at random with replacement, forever.
    resampled: bool = False
    # Random-resized-crop scale range and optional colour jitter strength (0 = off).
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    color_jitter: float = 0.0
    # Held-out pairs for the end-of-run evaluation (demo only).
    eval_samples: int = 256
    seed: int = 0
    # -- bad data and stalls (megatron_style/data/bad_data.py says what is skipped and why) --
    # A tar member claiming more bytes than this is skipped unread (member_too_large): one
    # member's read is bounded before it is made. 64 MiB passes every image that
    # max_image_pixels admits as JPEG/WebP and any real document (a long book is ~2 MB).
    max_member_bytes: int = 64 * 2**20
    # An image whose header says more pixels than this is skipped before decoding
    # (image_too_large). 64 Mpx admits 8K frames and 45-61 Mpx camera photos; decoded as RGB it
    # is ~0.2 GB per worker, where a 20 KB PNG may claim 13000^2 pixels (2.9 GB decoded). At
    # most Pillow's own bomb limit (89478485), so Pillow never warns on an admitted image.
    max_image_pixels: int = 64_000_000
    # The run stops when more than this fraction of a stream's last bad_sample_window samples
    # (per loader worker) were bad: a broken data set stops with the counts rather than
    # spinning; a whole shard of bad samples (img2dataset writes 10000 a shard) does not.
    max_bad_fraction: float = 0.5
    bad_sample_window: int = 100_000
    # Shards a brace pattern or listing names but that do not exist: up to this fraction of a
    # stream's shards, warn and count each as unreadable_shard when its turn comes (a few
    # failed downloads); above it, stop at start-up (a wrong range or an unmounted copy).
    max_missing_shards_fraction: float = 0.01
    # Resume from a checkpoint written with another shard list (a bad shard removed, shards
    # added): the position is carried over the way a resume on another number of ranks is
    # (data/reshard.py). Off, such a resume is refused so that a changed list is never silent.
    allow_shard_list_change: bool = False
    # A shard read from a command (pipe:, http(s)://, s3://, gs://) that sends no byte for this
    # long is given up: the command is killed, the shard counted, the reader goes on. 300 s
    # rides out network hiccups and throttling; a dead source costs minutes, not the run.
    read_timeout_s: float = 300.0
    # No batch from the loader workers for this long stops the run with an error naming this
    # key (0 = wait forever). Above read_timeout_s, which handles single stalled shards (a batch
    # may meet one per stream), and below guards.stall_timeout_s, so that the cause is named.
    loader_timeout_s: float = 1200.0

    def stream_weights(self) -> dict[str, float]:
        return {s: getattr(self, s).weight for s in STREAMS}

    def stream_counts(self) -> dict[str, int]:
        """Samples of each stream in one micro-batch: micro_batch_size split by the weights
        (largest remainder, ties to the earlier stream), the same for every micro-batch."""
        w = self.stream_weights()
        total = sum(w.values())
        exact = {s: self.micro_batch_size * w[s] / total for s in STREAMS}
        counts = {s: int(exact[s]) for s in STREAMS}
        left = self.micro_batch_size - sum(counts.values())
        for s in sorted(STREAMS, key=lambda s: (-(exact[s] - counts[s]), STREAMS.index(s)))[:left]:
            counts[s] += 1
        return counts

    def validate(self, key: str = "data") -> None:
        _check(self.micro_batch_size >= 1, f"{key}.micro_batch_size",
               f"must be >= 1, got {self.micro_batch_size}")
        for s in STREAMS:
            w = getattr(self, s).weight
            _check(w >= 0 and math.isfinite(w), f"{key}.{s}.weight",
                   f"must be a finite number >= 0, got {w}")
        _check(sum(self.stream_weights().values()) > 0, f"{key}.<stream>.weight",
               "at least one of image/text/pair needs a weight > 0")
        if self.source == "shards":
            for s in STREAMS:
                st = getattr(self, s)
                _check(st.weight == 0 or bool(st.shards), f"{key}.{s}.shards",
                       f"stream {s!r} has weight {st.weight} but no shards; give a brace "
                       "pattern, directory or list file, or set its weight to 0")
        _check(self.num_workers >= 0, f"{key}.num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.shuffle_buffer >= 0, f"{key}.shuffle_buffer",
               f"must be >= 0, got {self.shuffle_buffer}")
        _check(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
               f"{key}.crop_scale", f"must be [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}")
        _check(0.0 <= self.color_jitter <= 1.0, f"{key}.color_jitter",
               f"must be in [0, 1], got {self.color_jitter}")
        _check(self.eval_samples >= 0, f"{key}.eval_samples", f"must be >= 0, got {self.eval_samples}")
        _check(self.max_member_bytes >= 1024, f"{key}.max_member_bytes",
               f"must be >= 1024 bytes, got {self.max_member_bytes}")
        pillow_limit = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: above it Pillow warns or refuses
        _check(1 <= self.max_image_pixels <= pillow_limit, f"{key}.max_image_pixels",
               f"must be in [1, {pillow_limit}] (Pillow's decompression-bomb limit), got "
               f"{self.max_image_pixels}")
        _check(0 < self.max_bad_fraction <= 1, f"{key}.max_bad_fraction",
               f"must be in (0, 1] (1 = never stop for bad data), got {self.max_bad_fraction}")
        _check(self.bad_sample_window >= 1, f"{key}.bad_sample_window",
               f"must be >= 1 sample, got {self.bad_sample_window}")
        _check(0 <= self.max_missing_shards_fraction <= 1, f"{key}.max_missing_shards_fraction",
               f"must be in [0, 1] (0 = every shard must exist), got "
               f"{self.max_missing_shards_fraction}")
        _check(self.read_timeout_s > 0 and math.isfinite(self.read_timeout_s),
               f"{key}.read_timeout_s", f"must be > 0 seconds, got {self.read_timeout_s}")
        _check(self.loader_timeout_s == 0 or self.loader_timeout_s > self.read_timeout_s,
               f"{key}.loader_timeout_s",
               f"must be 0 (off) or more than {key}.read_timeout_s={self.read_timeout_s}, got "
               f"{self.loader_timeout_s}")
        self.masking.validate(f"{key}.masking")
        self.tokenizer.validate(f"{key}.tokenizer")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass
class OptimConfig:
    """AdamW as in the paper: (0.9, 0.98), eps 1e-6, wd 0.05, clip 3.0."""

    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.05
    grad_clip: float = 3.0
    # Linear warmup, then cosine decay to min_lr_ratio * lr at the last step.
    warmup_steps: int = 10_000
    min_lr_ratio: float = 0.0
    # "torch": torch.optim.AdamW (fused on CUDA); "deepspeed": DeepSpeed's FusedAdam / CPU Adam;
    # "apex": NVIDIA apex FusedAdam when installed.
    impl: Literal["torch", "deepspeed", "apex"] = "torch"

    def validate(self, key: str = "optim") -> None:
        _check(self.lr > 0 and math.isfinite(self.lr), f"{key}.lr", f"must be > 0, got {self.lr}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{key}.betas",
               f"must be two numbers in [0, 1), got {self.betas}")
        _check(self.eps > 0, f"{key}.eps", f"must be > 0, got {self.eps}")
        _check(self.weight_decay >= 0, f"{key}.weight_decay",
               f"must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip >= 0, f"{key}.grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        _check(self.warmup_steps >= 0, f"{key}.warmup_steps",
               f"must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, f"{key}.min_lr_ratio",
               f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class ParallelConfig:
    # Tensor-parallel degree (ranks of a node); data parallelism takes the rest of the world.
    tensor: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 1
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    grad_accum: int = 1
    # Recompute each block's activations in backward (saves memory, costs ~1/3 more compute).
    activation_checkpointing: bool = False
    # A DeepSpeed JSON config merged over the generated one (e.g. configs/deepspeed/
    # zero3_offload.json), then `deepspeed` entries on top. Batch sizes stay ours:
    # data.micro_batch_size and parallel.grad_accum.
    deepspeed_file: str = ""
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def validate(self, key: str = "parallel") -> None:
        _check(self.tensor >= 1, f"{key}.tensor", f"must be >= 1, got {self.tensor}")
        _check(self.zero_stage in (0, 1, 2, 3), f"{key}.zero_stage",
               f"must be one of 0, 1, 2, 3, got {self.zero_stage}")
        _check(self.grad_accum >= 1, f"{key}.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(not self.sequence_parallel, f"{key}.sequence_parallel",
               "is not supported: for packed streams of <= 300-token samples it would save ~2 GiB "
               "on the giant (0.6 GiB with activation checkpointing) at the cost of re-routing "
               "the expert-sorted stream around every collective; use "
               "parallel.activation_checkpointing instead (see megatron_style/parallel/state.py)")
        _check(not self.deepspeed_file or os.path.isfile(self.deepspeed_file),
               f"{key}.deepspeed_file", f"{self.deepspeed_file!r} does not exist")
        extra = dict(self.deepspeed)
        if self.deepspeed_file:
            try:
                with open(self.deepspeed_file) as f:
                    extra.update(json.load(f))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key}.deepspeed_file: {self.deepspeed_file!r} is not valid JSON: {e}") from None
        for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            _check(k not in extra, f"{key}.deepspeed", f"{k!r} is set by the trainer from "
                   "data.micro_batch_size and parallel.grad_accum; remove it")
        # What the recipe names must not be contradicted by the file (one source of truth).
        stage = extra.get("zero_optimization", {}).get("stage", self.zero_stage)
        _check(stage == self.zero_stage, f"{key}.zero_stage",
               f"is {self.zero_stage} but the DeepSpeed config says stage {stage}; make them agree")
        for prec in ("bf16", "fp16"):
            on = extra.get(prec, {}).get("enabled")
            _check(on is None or on == (self.precision == prec), f"{key}.precision",
                   f"is {self.precision!r} but the DeepSpeed config has {prec}.enabled={on}")


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    every_steps: int = 1000
    keep_last: int = 3
    # "auto": the latest complete checkpoint in `dir` if any; "none"; or a checkpoint path.
    resume: str = "auto"
    # Initialise the model (not the optimizer) from a released BEiT-3 file or our export.
    init_from: str = ""
    # false: write no checkpoint at all (measurement runs: the giant's is 31 GB); resuming
    # from one still works.
    save: bool = True

    def validate(self, key: str = "checkpoint") -> None:
        _check(self.every_steps >= 1, f"{key}.every_steps", f"must be >= 1, got {self.every_steps}")
        _check(self.keep_last >= 1, f"{key}.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class LoggingConfig:
    dir: str = "runs/default/tensorboard"
    every_steps: int = 10
    # "auto": a progress bar on a terminal, plain lines otherwise.
    progress: Literal["auto", "bar", "lines"] = "auto"
    # Dense bf16/fp16 peak of one device in TFLOP/s for MFU; 0 = look the device up.
    peak_tflops: float = 0.0
    # torch.profiler trace of steps profile_at_step .. + profile_steps - 1 on profile_ranks,
    # into <dir>/profile (train/profiling.py); 0 = off.
    profile_at_step: int = 0
    profile_steps: int = 3
    profile_ranks: list[int] = field(default_factory=lambda: [0])

    def validate(self, key: str = "logging") -> None:
        _check(self.every_steps >= 1, f"{key}.every_steps", f"must be >= 1, got {self.every_steps}")
        _check(self.peak_tflops >= 0, f"{key}.peak_tflops", f"must be >= 0, got {self.peak_tflops}")
        _check(self.profile_at_step >= 0, f"{key}.profile_at_step",
               f"must be >= 0 (0 = no profile), got {self.profile_at_step}")
        _check(self.profile_steps >= 1, f"{key}.profile_steps",
               f"must be >= 1, got {self.profile_steps}")
        _check(all(r >= 0 for r in self.profile_ranks), f"{key}.profile_ranks",
               f"must be global ranks (>= 0), got {self.profile_ranks}")


@dataclass
class GuardConfig:
    # Stop (with a checkpoint of the last good state) after this many non-finite losses in a row.
    max_nonfinite_in_a_row: int = 5
    # A loss above spike_factor x its running mean (over spike_window steps) is logged.
    spike_factor: float = 3.0
    spike_window: int = 100
    # End the run (status 124, every thread's stack in the log) when no step, start-up phase
    # or checkpoint completes for this long: a stalled collective or file system must not keep
    # a job alive doing nothing. Sized for the giant: start-up with a checkpoint load and a
    # 31 GB save fit well inside 30 minutes. 0 = off.
    stall_timeout_s: float = 1800.0

    def validate(self, key: str = "guards") -> None:
        _check(self.stall_timeout_s == 0 or self.stall_timeout_s >= 1,
               f"{key}.stall_timeout_s", f"must be 0 (off) or >= 1 second, got {self.stall_timeout_s}")
        _check(self.max_nonfinite_in_a_row >= 1, f"{key}.max_nonfinite_in_a_row",
               f"must be >= 1, got {self.max_nonfinite_in_a_row}")
        _check(self.spike_factor > 1, f"{key}.spike_factor", f"must be > 1, got {self.spike_factor}")
        _check(self.spike_window >= 2, f"{key}.spike_window", f"must be >= 2, got {self.spike_window}")


@dataclass
class PretrainConfig:
    """Everything one pretraining run needs; one YAML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    steps: int = 1000
    # End this invocation after this step (with a checkpoint) without changing the schedule,
    # e.g. to fit a time-limited allocation; 0 = run to `steps`.
    stop_at_step: int = 0
    seed: int = 0
    # Run the held-out image-vs-swapped-image evaluation at the end (demo data only).
    eval_at_end: bool = True
    run_name: str = "default"

    def validate(self) -> None:
        _check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _check(self.stop_at_step >= 0, "stop_at_step", f"must be >= 0 (0 = off), got {self.stop_at_step}")
        self.model.validate("model")
        self.data.validate("data")
        self.optim.validate("optim")
        self.parallel.validate("parallel")
        self.checkpoint.validate("checkpoint")
        self.logging.validate("logging")
        self.guards.validate("guards")
        if self.parallel.tensor > 1:
            _check(self.model.heads % self.parallel.tensor == 0, "parallel.tensor",
                   f"model.heads {self.model.heads} must be divisible by tensor {self.parallel.tensor}")
            _check(self.model.ffn_dim % self.parallel.tensor == 0, "parallel.tensor",
                   f"model.ffn_dim {self.model.ffn_dim} must be divisible by tensor "
                   f"{self.parallel.tensor}")


# --------------------------------------------------------------------------------------------
# Loading: dicts -> dataclasses with type checks, unknown keys rejected, overrides
# --------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if origin is Literal:
        _check(value in typing.get_args(tp), key, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        _check(isinstance(value, (list, tuple)), key, f"expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key,
               f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {tp}")


def from_dict(cls: type, data: dict[str, Any], key: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrongly typed values."""
    if cls is ModelConfig:
        data = _expand_preset(data, key or "model")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key; {cls.__name__} accepts "
                          f"{', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{key}.{k}" if key else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML: numbers, true/false, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    k, v = text.split("=", 1)
    k = k.strip().lstrip("-")
    if not k:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(v) if v.strip() else ""
    except yaml.YAMLError:
        value = v
    return k.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path!r} is not valid YAML/JSON: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: expected a mapping at the top level")
    return data


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> PretrainConfig:
    """Read a recipe, apply `key=value` overrides, build and validate the whole config."""
    data = read_config_file(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    cfg = from_dict(PretrainConfig, data)
    cfg.validate()
    return cfg


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=False)
