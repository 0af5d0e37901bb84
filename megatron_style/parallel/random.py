"""The random stream of a rank under tensor and data parallelism.

The model's only randomness after initialisation is drop path, which acts on the residual
stream: every rank of a tensor-parallel group holds it whole, so they must draw the SAME
numbers, or their copies drift apart; data-parallel ranks see different samples and draw
differently. Hence one default generator per rank, seeded by its data-parallel rank alone.

There is no second stream for sharded regions (Megatron's RNG tracker, for dropout on a rank's
heads or FFN columns): BEiT-3 trains without dropout (Table 11), so nothing draws there. Add
one, with its replay under activation checkpointing, together with the first such dropout.
"""
from __future__ import annotations

import torch


def seed_data_parallel_rank(seed: int, dp_rank: int) -> None:
    """Seed this rank's default generators (CPU and CUDA) for the steps: the same within a
    tensor-parallel group, different across data-parallel ranks. Called after the model is
    built, since the TP layers draw full matrices from the run's seed and keep their slice."""
    torch.manual_seed(seed + 1000 * dp_rank + 1)
