"""The training data loader: micro-batches of packed samples from three streams, resumable.

    loader = build_train_loader(cfg, dp_rank, dp_world, processor)
    loader.load_state_dict(saved)        # on resume, before iterating
    it = iter(loader)
    batch = next(it)                     # a PackedBatch with cfg.data.micro_batch_size samples
    saved = loader.state_dict()          # what the trainer has consumed, for the checkpoint
    loader.bad_sample_counts()           # {"bad_image": 3, ...} cumulative on this rank

Each DataLoader worker is a *logical worker* w of W (W = max(1, num_workers)) that builds whole
PackedBatches: for every stream it takes that stream's fixed share of the micro-batch from its
own reader (streams.py), runs the processor (augment / tokenize / mask) and packs.

Why the state is exact: every batch carries its worker's reader positions and bad-data counts as
they are right after that batch. The main process keeps, per worker, the state carried by the
last batch the trainer took, so prefetched batches never count. Torch hands out batches of an
infinite IterableDataset round-robin from worker 0; on resume, physical worker p plays logical
worker (p + consumed) mod W, so the next batch comes from the worker whose turn it was.

On a resume with another number of data-parallel ranks or loader workers the exact position
cannot be kept (readers own other shards); `load_resharded` takes every old rank's state and
goes on from where they stood, as reshard.py explains. The same path carries the position over
to a changed shard list, when data.allow_shard_list_change says so.

Bad samples are skipped and counted (bad_data.py); a stream whose recent samples are mostly bad
stops the run (BadFraction). A worker that delivers no batch for data.loader_timeout_s stops it
too, with an error naming that key, rather than leaving the run waiting forever.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_style.config import STREAMS, ConfigError, PretrainConfig
from megatron_style.data.bad_data import BadDataCounter, BadFraction, sum_counts
from megatron_style.data.errors import BadSample
from megatron_style.data.raw import RawSample
from megatron_style.data.reshard import (LAYOUT_KEYS, data_differences, describe_base, pack_names,
                                         reshard)
from megatron_style.data.shards import check_data_paths, shard_list_digest
from megatron_style.data.streams import DemoStream, ShardStream, check_enough_shards
from megatron_style.data.tar_samples import ReadLimits
from megatron_style.batch import PackedBatch, Sample, pack_samples

log = logging.getLogger("megatron_style.data")

STATE_VERSION = 1
#: The defaults of data.bad_sample_window / data.max_bad_fraction, for callers without a config.
BAD_WINDOW, MAX_BAD_FRACTION = 100_000, 0.5

Processor = Callable[[RawSample, np.random.Generator], Sample]
DemoGet = Callable[[str, int], RawSample]


@dataclasses.dataclass
class LoaderPlan:
    """Everything that fixes the sample sequence of one rank; saved with the state so that a
    resume with different settings is refused rather than silently repeating or skipping."""

    source: str
    dp_rank: int
    dp_world: int
    num_workers: int            # logical workers W (>= 1)
    counts: dict[str, int]      # samples per stream per micro-batch
    seed: int
    window: int
    resampled: bool
    urls: dict[str, list[str]]  # shards of each active stream (empty for demo)
    # Safety limits, not part of describe(): changing them never refuses a resume.
    limits: ReadLimits = dataclasses.field(default_factory=ReadLimits)
    bad_window: int = BAD_WINDOW
    max_bad_fraction: float = MAX_BAD_FRACTION
    allow_shard_list_change: bool = False

    def describe(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("source", "dp_rank", "dp_world", "num_workers",
                                           "counts", "seed")}
        if self.source == "shards":
            d.update(window=self.window, resampled=self.resampled,
                     shards={s: [len(u), shard_list_digest(u)] for s, u in self.urls.items()})
        return d


def good_samples(stream: str, items: Iterator, processor: Processor, bad: BadDataCounter,
                 rate: Optional[BadFraction] = None) -> Iterator[Sample]:
    """Processed samples of one stream's reader items; bad ones are counted and skipped. The
    run stops (RuntimeError) when `rate` finds the stream's recent samples mostly bad."""
    rate = rate or BadFraction(stream, BAD_WINDOW, MAX_BAD_FRACTION)
    for raw, key in items:
        try:
            if isinstance(raw, BadSample):
                raise raw
            sample = processor(raw, np.random.default_rng(key))
        except BadSample as e:
            bad.add(e.reason, str(e))
            rate.record(True, bad.counts, str(e))
            continue
        rate.record(False, bad.counts)
        if not sample.source:
            sample.source = raw.source
        yield sample


class BatchMaker:
    """One logical worker: readers for the active streams, the processor, packing."""

    def __init__(self, plan: LoaderPlan, worker: int, processor: Processor, model_cfg,
                 demo: Optional[DemoGet], state: Optional[dict[str, Any]] = None,
                 base: Optional[dict[str, Any]] = None) -> None:
        st, base = state or {}, base or {}
        self.plan, self.worker, self.processor, self.model_cfg = plan, worker, processor, model_cfg
        self.batches = int(st.get("batches", 0))
        reader = plan.dp_rank * plan.num_workers + worker
        num_readers = plan.dp_world * plan.num_workers
        self.bad = BadDataCounter(st.get("bad"), where=f"rank {plan.dp_rank} worker {worker}")
        self.readers: dict[str, Any] = {}
        self._iters: dict[str, Iterator] = {}
        rates = {s: BadFraction(s, plan.bad_window, plan.max_bad_fraction) for s in STREAMS}
        for s in STREAMS:
            if plan.counts[s] == 0:
                continue
            s_state = st.get("streams", {}).get(s)
            if plan.source == "demo":
                if demo is None:
                    raise ValueError("data.source demo needs the demo generator")
                r = DemoStream(s, demo, reader, num_readers, plan.seed, s_state, base=base.get(s))
            else:
                r = ShardStream(s, plan.urls[s], reader, num_readers, plan.seed, plan.window,
                                plan.resampled, self.bad, s_state, base=base.get(s),
                                limits=plan.limits, rate=rates[s])
            self.readers[s] = r
            self._iters[s] = iter(r)
        self._good = {s: good_samples(s, it, processor, self.bad, rates[s])
                      for s, it in self._iters.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "bad": self.bad.as_dict(),
                "streams": {s: r.state_dict() for s, r in self.readers.items()}}

    def _take(self, stream: str) -> Sample:
        sample = next(self._good[stream], None)
        if sample is None:
            raise RuntimeError(f"stream {stream!r} ended; the training loader reads forever "
                               "(this is a bug)")
        return sample

    def next_batch(self) -> PackedBatch:
        samples = [self._take(s) for s in STREAMS for _ in range(self.plan.counts[s])]
        self.batches += 1
        return pack_samples(samples, self.model_cfg)


class _WorkerBatches(IterableDataset):
    """What each DataLoader worker runs: (PackedBatch, its worker's state after it), forever."""

    def __init__(self, plan: LoaderPlan, processor: Processor, model_cfg, demo: Optional[DemoGet],
                 states: list[Optional[dict]], offset: int, base: dict[str, Any]) -> None:
        super().__init__()
        self.plan, self.processor, self.model_cfg, self.demo = plan, processor, model_cfg, demo
        self.states, self.offset, self.base = states, offset, base

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        W = self.plan.num_workers
        worker = (physical + self.offset) % W
        maker = BatchMaker(self.plan, worker, self.processor, self.model_cfg, self.demo,
                           self.states[worker], self.base)
        while True:
            batch = maker.next_batch()
            yield batch, {"worker": worker, "state": maker.state_dict()}


def _as_is(x):
    return x


class TrainLoader:
    """An iterable of PackedBatch micro-batches for one data-parallel rank; see module doc."""

    def __init__(self, cfg: PretrainConfig, plan: LoaderPlan, processor: Processor,
                 demo: Optional[DemoGet] = None) -> None:
        self.cfg, self.plan, self.processor, self.demo = cfg, plan, processor, demo
        self._states: list[Optional[dict]] = [None] * plan.num_workers
        self._consumed = 0
        self._generation = 0
        self._base: dict[str, Any] = {}  # per stream, after a resharded resume (reshard.py)
        self._names: Optional[dict[str, str]] = None  # shard_names(), computed once

    @property
    def samples_per_batch(self) -> int:
        return sum(self.plan.counts.values())

    def __iter__(self) -> Iterator[PackedBatch]:
        self._generation += 1
        W = self.plan.num_workers
        ds = _WorkerBatches(self.plan, self.processor, self.cfg.model, self.demo,
                            list(self._states), self._consumed % W, self._base)
        # The DataLoader draws a base seed when its iterator starts; with its own generator it
        # leaves the global RNG (drop path) alone, so a resumed run that starts its iterator at
        # step N draws exactly what the uninterrupted run drew. (Our readers seed themselves.)
        # A stalled worker (a hung file system, a source the read timeout cannot see) must end
        # the run with its cause named, not leave it waiting; torch allows a timeout only with
        # worker processes (without them the trainer's own watchdog is the net).
        timeout = self.cfg.data.loader_timeout_s if self.cfg.data.num_workers > 0 else 0
        dl = DataLoader(ds, batch_size=None, collate_fn=_as_is,
                        num_workers=self.cfg.data.num_workers,
                        pin_memory=torch.cuda.is_available(), timeout=timeout,
                        generator=torch.Generator().manual_seed(self.cfg.data.seed))
        return self._consume(dl, self._generation, timeout)

    def _consume(self, dl: DataLoader, generation: int, timeout: float) -> Iterator[PackedBatch]:
        W = self.plan.num_workers
        it = iter(dl)
        while True:
            try:
                batch, meta = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if timeout and str(e).startswith("DataLoader timed out"):
                    raise RuntimeError(
                        f"data loader of data-parallel rank {self.plan.dp_rank}: no batch from "
                        f"loader worker {self._consumed % W} for {timeout:g} s "
                        f"(data.loader_timeout_s={timeout:g}): a data source has stalled (shards "
                        f"on a hung file system?); bad data so far: {self.bad_sample_counts()}. "
                        "Raise data.loader_timeout_s if batches are just this slow") from e
                raise
            if generation != self._generation:
                raise RuntimeError("this iterator was replaced by a newer iter(loader); use that one")
            want = self._consumed % W
            if meta["worker"] != want:
                raise RuntimeError(f"batch from loader worker {meta['worker']} where worker "
                                   f"{want} was due: the resumable order is broken")
            self._states[want] = meta["state"]
            self._consumed += 1
            yield batch

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch the trainer took (plain ints, lists, dicts).
        Rank 0's also names the shards (epoch mode), so that a resume with
        data.allow_shard_list_change can tell which of them were read."""
        st = copy.deepcopy({"version": STATE_VERSION, "plan": self.plan.describe(),
                            "consumed": self._consumed, "workers": self._states,
                            "base": self._base})
        if self.plan.dp_rank == 0 and self.plan.source == "shards" and not self.plan.resampled:
            st["shard_names"] = self.shard_names()
        return st

    def shard_names(self) -> dict[str, str]:
        """Per stream, the shard list's file names, compressed (a 200k-shard list is ~100 KB)."""
        if self._names is None:
            self._names = {s: pack_names([os.path.basename(u) for u in urls])
                           for s, urls in self.plan.urls.items()}
        return self._names

    def _allowed_differences(self) -> tuple[str, ...]:
        return ("shards",) if self.plan.allow_shard_list_change else ()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the saved position; call before iter(loader). Refuses a state saved
        with other settings (rank, world, workers, shards, batch split, seed), naming them;
        a changed shard list only without data.allow_shard_list_change."""
        _check_version(state)
        mine, saved = self.plan.describe(), state["plan"]
        diff = data_differences(mine, saved)
        if diff and set(diff) <= set(self._allowed_differences()):
            # Only the shard list changed, and that is allowed: carry the position over, which
            # needs every old rank's position (the trainer goes there by layout_changed).
            if int(saved["dp_world"]) != 1:
                raise ValueError("the shard list changed: with data.allow_shard_list_change the "
                                 "position is carried over by load_resharded(every old rank's "
                                 "loader state)")
            log.warning("data loader: %s", self.load_resharded([state]))
            return
        if diff:
            what = "; ".join(f"{k}: saved {saved.get(k)!r}, now {mine.get(k)!r}" for k in diff)
            hint = (" If the shard list was changed on purpose (a bad shard removed, shards "
                    "added), set data.allow_shard_list_change: true to carry the position over "
                    "to the new list" if "shards" in diff else "")
            raise ValueError(f"the data loader state was saved with other settings ({what}); "
                             "resuming would repeat or skip samples. Resume with the same data "
                             f"settings, data-parallel size and data.num_workers.{hint}")
        self._states = list(state["workers"])
        self._consumed = int(state["consumed"])
        self._base = copy.deepcopy(state.get("base", {}))

    def layout_changed(self, state: dict[str, Any]) -> bool:
        """Whether `state` (this rank's, saved with the same data settings) was written with
        another number of ranks or loader workers, or with another shard list while
        data.allow_shard_list_change is on: then resume with `load_resharded`."""
        _check_version(state)
        mine, saved = self.plan.describe(), state["plan"]
        ignore = LAYOUT_KEYS + self._allowed_differences()
        return (not data_differences(mine, saved, ignore=ignore)
                and bool(data_differences(mine, saved)))

    def load_resharded(self, states: list[dict[str, Any]]) -> str:
        """Go on from where all the old ranks' loaders (`states`, one per old rank) stood, on
        this rank's new layout; call before iter(loader). Returns a line for the log."""
        for s in states:
            _check_version(s)
        self.load_state_dict(reshard(states, self.plan))
        return describe_base(self._base, self.plan.urls)

    def bad_sample_counts(self) -> dict[str, int]:
        """Skipped samples per reason on this rank, cumulative over the run (resumes included),
        up to the last batch taken."""
        return sum_counts([s["bad"] for s in self._states if s])


def _check_version(state: Any) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"not a loader state of version {STATE_VERSION}: {str(state)[:80]!r}")


def build_train_loader(cfg: PretrainConfig, dp_rank: int, dp_world: int, processor: Processor,
                       demo: Optional[DemoGet] = None) -> TrainLoader:
    """The training loader of data-parallel rank `dp_rank` of `dp_world`. `processor` turns a
    RawSample and a numpy Generator into a masked Sample (data/processor.py). `demo` overrides
    the demo generator's `(kind, index) -> RawSample` (tests)."""
    if not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank must be in [0, dp_world={dp_world}), got {dp_rank}")
    data = cfg.data
    counts = data.stream_counts()
    if data.source == "shards":
        urls = check_data_paths(cfg)
        for s, u in urls.items():
            check_enough_shards(s, len(u), dp_world * max(1, data.num_workers), data.resampled)
    elif data.source == "demo":
        urls = {}
        if demo is None:
            demo = default_demo(cfg)
    else:
        raise ConfigError(f"data.source: build_train_loader reads 'demo' or 'shards', got "
                          f"{data.source!r}")
    plan = LoaderPlan(source=data.source, dp_rank=dp_rank, dp_world=dp_world,
                      num_workers=max(1, data.num_workers), counts=counts, seed=data.seed,
                      window=max(1, data.shuffle_buffer), resampled=data.resampled, urls=urls,
                      limits=ReadLimits.from_config(data), bad_window=data.bad_sample_window,
                      max_bad_fraction=data.max_bad_fraction,
                      allow_shard_list_change=data.allow_shard_list_change)
    return TrainLoader(cfg, plan, processor, demo)


def default_demo(cfg: PretrainConfig) -> DemoGet:
    from megatron_style.data.demo import DemoSource
    return DemoSource.from_config(cfg).sample


def measure(loader: TrainLoader, batches: int, warmup: int = 2) -> float:
    """Samples per second the loader delivers (after `warmup` batches start the workers)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * loader.samples_per_batch / (time.perf_counter() - t0)
