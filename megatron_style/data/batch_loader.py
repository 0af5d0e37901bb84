"""What the trainer needs of a loader, whichever makes the batches: the shard/demo
TrainLoader (loader.py) or the SyntheticLoader (synthetic_loader.py)."""
from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

from megatron_style.batch import PackedBatch


@runtime_checkable
class BatchLoader(Protocol):
    def __iter__(self) -> Iterator[PackedBatch]:
        """Packed CPU batches, forever (the trainer decides when to stop)."""

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch taken; plain ints, lists and dicts."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after a saved position of the same layout (call before iter)."""

    def layout_changed(self, state: dict[str, Any]) -> bool:
        """Whether `state` was saved by another number of ranks or workers."""

    def load_resharded(self, states: list[dict[str, Any]]) -> str:
        """Continue from every old rank's position on this layout; returns a log line."""

    def bad_sample_counts(self) -> dict[str, int]:
        """Skipped samples per reason on this rank, cumulative over the run."""
