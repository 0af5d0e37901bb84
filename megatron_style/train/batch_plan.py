"""The global batch of a run and the gradient accumulation that gives it on the ranks at hand.

    global batch = data.micro_batch_size x accumulation x data-parallel ranks

With `data.global_batch_size` set (the paper's 6144 in base.yaml and giant.yaml), the
accumulation is derived for the number of ranks the run starts on, so the same recipe trains
the same batch on 1, 2, 4 or 128 GPUs, and a resume on another number of GPUs keeps it. Without
it, the batch is micro x parallel.grad_accum x ranks at the first start; every checkpoint
records it (its COMPLETE manifest), and a resume on another number of ranks keeps the
checkpoint's batch by changing the accumulation. When the batch cannot be split over the ranks
the run stops with a ConfigError naming the numbers that would work: before any process group
starts when the recipe says the batch (train/preflight.py), at start-up when the checkpoint does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_style.config import STREAMS, ConfigError, PretrainConfig


@dataclass(frozen=True)
class BatchPlan:
    micro: int                 # samples per micro-batch on one rank
    grad_accum: int            # micro-batches per step on one rank
    ranks: int                 # data-parallel ranks
    per_micro: dict[str, int]  # samples of each stream in one micro-batch

    @property
    def global_batch(self) -> int:
        return self.micro * self.grad_accum * self.ranks

    def per_step(self) -> dict[str, int]:
        """Samples of each stream in one step over all ranks."""
        return {s: n * self.grad_accum * self.ranks for s, n in self.per_micro.items()}

    def describe(self) -> str:
        """The start-up line."""
        def split(counts: dict[str, int]) -> str:
            return ", ".join(f"{counts[s]} {s}" for s in STREAMS)
        return (f"batch: global batch {self.global_batch} samples per step ({split(self.per_step())})"
                f" = micro-batch {self.micro} ({split(self.per_micro)}) x {self.grad_accum} "
                f"accumulation x {self.ranks} data-parallel rank(s)")


def _splits(total: int, micro: int) -> str:
    """Data-parallel rank counts that divide `total` samples in micro-batches of `micro`."""
    rounds = total // micro
    ok = [n for n in range(1, rounds + 1) if rounds % n == 0]
    shown = ", ".join(str(n) for n in ok[:12]) + (", ..." if len(ok) > 12 else "")
    return shown


def _derive(total: int, micro: int, ranks: int, what: str) -> int:
    if total % (micro * ranks):
        raise ConfigError(
            f"{what}: {total} samples per step cannot be split over {ranks} data-parallel "
            f"rank(s) x {micro} samples per micro-batch ({micro * ranks} per round of "
            f"micro-batches). With data.micro_batch_size={micro} it divides over "
            f"{_splits(total, micro)} data-parallel ranks; or choose a data.micro_batch_size "
            f"that divides {total} / {ranks}")
    return total // (micro * ranks)


def plan_batch(cfg: PretrainConfig, ranks: int, saved_global: Optional[int] = None,
               saved_where: str = "") -> tuple[BatchPlan, Optional[str]]:
    """The batch of this run on `ranks` data-parallel ranks, and a note for the log when it
    differs from what the checkpoint (`saved_global`, 0 / None = unknown) was trained with."""
    d = cfg.data
    counts = d.stream_counts()
    note = None
    if d.global_batch_size:
        accum = _derive(d.global_batch_size, d.micro_batch_size, ranks, "data.global_batch_size")
        if saved_global and saved_global != d.global_batch_size:
            note = (f"the global batch changes from the checkpoint's {saved_global} to "
                    f"{d.global_batch_size} samples per step (data.global_batch_size)")
    elif saved_global and saved_global != d.micro_batch_size * cfg.parallel.grad_accum * ranks:
        # A resume on another number of ranks: keep the run's batch, not its accumulation.
        what = f"the global batch of checkpoint {saved_where}".strip()
        accum = _derive(saved_global, d.micro_batch_size, ranks, what)
        note = (f"keeping the checkpoint's global batch of {saved_global} samples per step: "
                f"{accum} accumulation on {ranks} data-parallel rank(s) (parallel.grad_accum="
                f"{cfg.parallel.grad_accum} would give "
                f"{d.micro_batch_size * cfg.parallel.grad_accum * ranks}; set "
                "data.global_batch_size to change the batch on purpose)")
    else:
        accum = cfg.parallel.grad_accum
    return BatchPlan(d.micro_batch_size, accum, ranks, counts), note


def data_parallel_ranks(cfg: PretrainConfig, world_size: int) -> int:
    return max(1, world_size // cfg.parallel.tensor)
