"""The training sections: optimizer, parallelism, checkpoints, logging, and guards."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_style.config.fields import bounded


@dataclass
class OptimConfig:
    """AdamW as in the paper: (0.9, 0.98), eps 1e-6, wd 0.05, clip 3.0."""

    lr: float = bounded(1e-3, gt=0)
    betas: list[float] = bounded([0.9, 0.98], ge=0, lt=1)
    eps: float = bounded(1e-6, gt=0)
    weight_decay: float = bounded(0.05, ge=0)
    # Which weights are decayed (the paper does not say). true: as unilm's BEiT, BEiT v2 and
    # BEiT-3 code (`no_weight_decay`): all but norms, biases, the CLS token and the vision
    # position table, so the text embedding, the text position table and the mask token are
    # decayed. false: those three are exempt too (this project's rule before issue 14).
    decay_embeddings: bool = True
    grad_clip: float = bounded(3.0, ge=0, note="0 = off")
    # Linear warmup, then cosine decay to min_lr_ratio * lr at the last step.
    warmup_steps: int = bounded(10_000, ge=0)
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)
    # "torch": torch.optim.AdamW (fused on CUDA); "deepspeed": DeepSpeed's FusedAdam / CPU Adam;
    # "apex": NVIDIA apex FusedAdam when installed.
    impl: Literal["torch", "deepspeed", "apex"] = "torch"


@dataclass
class ParallelConfig:
    # Tensor-parallel degree (ranks of a node); data parallelism takes the rest of the world.
    # (No sequence parallelism: for packed streams of <= 300-token samples it would save ~2 GiB
    # on the giant, 0.6 GiB with activation checkpointing, at the cost of re-routing the
    # expert-sorted stream around every collective; see megatron_style/parallel/state.py.)
    tensor: int = bounded(1, ge=1)
    zero_stage: int = bounded(1, ge=0, le=3)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    # Micro-batches per step on each rank. With data.global_batch_size set it is derived
    # (global / (micro x data-parallel ranks)) and must be left at 1.
    grad_accum: int = bounded(1, ge=1)
    # Recompute each block's activations in backward (saves memory, costs ~1/3 more compute).
    activation_checkpointing: bool = False
    # A DeepSpeed JSON config merged over the generated one (e.g. configs/deepspeed/
    # zero3_offload.json), then `deepspeed` entries on top. Batch sizes stay ours:
    # data.micro_batch_size and data.global_batch_size (or parallel.grad_accum).
    deepspeed_file: str = ""
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    every_steps: int = bounded(1000, ge=1)
    keep_last: int = bounded(3, ge=1)
    # "auto": the latest complete checkpoint in `dir` if any; "none"; or a checkpoint path.
    resume: str = "auto"
    # Initialise the model (not the optimizer) from a released BEiT-3 file or our export.
    init_from: str = ""
    # false: write no checkpoint at all (measurement runs: the giant's is 31 GB); resuming
    # from one still works.
    save: bool = True


@dataclass
class LoggingConfig:
    dir: str = "runs/default/tensorboard"
    every_steps: int = bounded(10, ge=1)
    # "auto": a progress bar on a terminal, plain lines otherwise.
    progress: Literal["auto", "bar", "lines"] = "auto"
    # Dense bf16/fp16 peak of one device in TFLOP/s for MFU; 0 = look the device up.
    peak_tflops: float = bounded(0.0, ge=0)
    # torch.profiler trace of steps profile_at_step .. + profile_steps - 1 on profile_ranks,
    # into <dir>/profile (train/profiling.py); 0 = off.
    profile_at_step: int = bounded(0, ge=0, note="0 = no profile")
    profile_steps: int = bounded(3, ge=1)
    profile_ranks: list[int] = bounded([0], ge=0, note="global ranks")


@dataclass
class GuardConfig:
    # Stop (with a checkpoint of the last good state) after this many non-finite losses in a row.
    max_nonfinite_in_a_row: int = bounded(5, ge=1)
    # A loss above spike_factor x its running mean (over spike_window steps) is logged.
    spike_factor: float = bounded(3.0, gt=1)
    spike_window: int = bounded(100, ge=2)
    # End the run (status 124, every thread's stack in the log) when no step, start-up phase
    # or checkpoint completes for this long: a stalled collective or file system must not keep
    # a job alive doing nothing. Sized for the giant: start-up with a checkpoint load and a
    # 31 GB save fit well inside 30 minutes.
    stall_timeout_s: float = bounded(1800.0, off=0, ge=1)
