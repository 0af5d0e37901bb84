"""Random streams that are right under tensor and data parallelism.

Two kinds of randomness inside the model:
  * replicated regions (drop path on the residual stream, anything acting on activations that
    every tensor rank holds whole): all ranks of a tensor-parallel group must draw the SAME
    numbers, or their copies of the residual stream drift apart. They draw from the default
    generator, seeded identically within a TP group and differently across data-parallel
    ranks (each of which sees different samples).
  * sharded regions (e.g. dropout on a rank's heads or FFN columns): each tensor rank must
    draw DIFFERENT numbers, or the same mask repeats in every slice. Code there draws inside
    `tracker.fork()`, which swaps in a generator seeded per (data rank, tensor rank).

Order at start-up: seed every rank with the same `seed`, build the model (the TP layers draw
the full weights and keep their slice, so every rank must draw the same numbers), then call
`seed_parallel_rng(seed, state, device)`.

Activation checkpointing replays a block's forward in backward; the replay must draw the same
numbers. torch.utils.checkpoint restores the default generators; `checkpoint_fn(tracker)`
also restores the tracker's streams (through checkpoint's `context_fn`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.utils.checkpoint

TENSOR_PARALLEL_STREAM = "tensor-parallel"
# Distinct purposes get distinct seed streams (numpy SeedSequence mixes the words).
_PURPOSE_DEFAULT, _PURPOSE_TENSOR = 1, 2


def derive_seed(seed: int, *words: int) -> int:
    """A 63-bit seed from `seed` and identifying words; different words give unrelated seeds
    (no `seed + rank` collisions between streams)."""
    return int(np.random.SeedSequence([seed, *words]).generate_state(2, np.uint64)[0] >> 1)


class RNGTracker:
    """Named generator states for one device; `fork(name)` runs a block with that state as
    the device's default generator and keeps the advanced state for next time."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._states: dict[str, torch.Tensor] = {}

    def _get(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists; streams: {sorted(self._states)}")
        self._states[name] = torch.Generator(self.device).manual_seed(seed).get_state()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = TENSOR_PARALLEL_STREAM) -> Iterator[None]:
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added; streams: {sorted(self._states)}")
        outer = self._get()
        self._set(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._get()
            self._set(outer)


def seed_parallel_rng(seed: int, state, device: torch.device | str = "cpu") -> RNGTracker:
    """Seed the default generators (same across a TP group, different across data ranks) and
    return a tracker whose tensor-parallel stream differs on every rank. `state` is a
    ParallelState (anything with data_rank and tensor_rank)."""
    torch.manual_seed(derive_seed(seed, _PURPOSE_DEFAULT, state.data_rank))
    tracker = RNGTracker(device)
    tracker.add(TENSOR_PARALLEL_STREAM,
                derive_seed(seed, _PURPOSE_TENSOR, state.data_rank, state.tensor_rank))
    return tracker


class _RestoreTrackerForReplay:
    """checkpoint's context_fn pair: the forward context remembers the tracker's states as the
    block starts; the recompute context puts them back while the block is replayed, then
    returns the tracker to where the real forward left it."""

    def __init__(self, tracker: RNGTracker):
        self.tracker = tracker
        self.at_start: Optional[dict[str, torch.Tensor]] = None

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        self.at_start = self.tracker.get_states()
        yield

    @contextlib.contextmanager
    def recompute(self) -> Iterator[None]:
        now = self.tracker.get_states()
        self.tracker.set_states(self.at_start)
        try:
            yield
        finally:
            self.tracker.set_states(now)


def checkpoint_fn(tracker: Optional[RNGTracker]) -> Callable:
    """fn(block, x, layout) -> x for `MultiwayTransformer.checkpoint_fn`: non-reentrant
    torch.utils.checkpoint that replays default and tracker random streams exactly."""

    def run(block, x, layout):
        if tracker is None:
            return torch.utils.checkpoint.checkpoint(block, x, layout, use_reentrant=False)

        def contexts():
            r = _RestoreTrackerForReplay(tracker)
            return r.forward(), r.recompute()

        return torch.utils.checkpoint.checkpoint(block, x, layout, use_reentrant=False,
                                                 context_fn=contexts)

    return run
