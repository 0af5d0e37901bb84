"""The whole run: every section, the step counts, and its validation."""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_style.config.checks import check_run
from megatron_style.config.data import DataConfig
from megatron_style.config.fields import bounded, check_bounds
from megatron_style.config.model import ModelConfig
from megatron_style.config.objective import EvalConfig, ObjectiveConfig, StageConfig
from megatron_style.config.train import (CheckpointConfig, GuardConfig, LoggingConfig,
                                         OptimConfig, ParallelConfig)


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
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    # Consecutive training stages (config/objective.py); empty = one stage of `steps` steps
    # with the data section's streams, `objective`, and every parameter trained.
    stages: list[StageConfig] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    steps: int = bounded(1000, ge=1)
    # End this invocation after this step (with a checkpoint) without changing the schedule,
    # e.g. to fit a time-limited allocation; 0 = run to `steps`.
    stop_at_step: int = bounded(0, ge=0, note="0 = off")
    seed: int = 0
    # Run the held-out image-vs-swapped-image evaluation at the end (demo data only).
    eval_at_end: bool = True
    # Names the run in the start-up line and in TensorBoard's text tab.
    run_name: str = "default"

    def validate(self) -> None:
        """Every range, then every rule between fields (checks.py); file checks are made by
        the entry point before any process group starts (train/preflight.py)."""
        check_bounds(self)
        check_run(self)
