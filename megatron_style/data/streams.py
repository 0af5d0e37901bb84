"""Per-stream readers whose position can be saved and restored exactly.

Every loader worker of every data-parallel rank is one *reader* (id r of R = dp_world x
workers). For each stream (image / text / pair) a reader yields `(raw_or_bad, rng_key)`:
a RawSample (or the BadSample that says why there is none) and the integers that seed the
processor's random generator for it.

Why readers of our own rather than webdataset's shard lists, shuffle and split functions: those
keep their position inside Python generators and random-state objects, which cannot be saved,
and they read rank and world from the environment. Here every random choice is a pure function
of (seed, stream, reader, counter), so a reader's position is a handful of integers:

  - shards: epoch mode reshuffles the shard list per epoch (same permutation on every rank) and
    gives reader r the shards r, r+R, r+2R, ... of it; resampled mode draws reader r's i-th
    shard at random from the whole list. Either way "my i-th shard" is a function of i.
  - shuffling: samples are read in windows of `window` samples (never across an epoch end) and
    each window is given out in a random order drawn from (seed, stream, r, window number).
    This stands in for a shuffle buffer of the same size: the state is the window's start
    (shard i, samples already read from it) and how many of its samples were given out, and a
    resumed reader re-reads one window instead of needing the buffer's contents.
  - demo: the r-th, (r+R)-th, ... sample of the index-based demo generator; the state is a count.

After a resume on another number of readers every reader also gets the stream's *base*, shared
by all readers (reshard.py): where the old readers stood, so that the new ones go on from there.

A resume costs re-reading (not decoding) the saved window's shard up to the window start, and
the window itself. Epochs are per reader: one whose shards hold fewer samples starts its next
epoch sooner, as the training loader never waits for the others.
Reading one shard (member checks, grouping by key, decoding) is tar_samples.py; opening it
(files, commands, timeouts) is shard_io.py.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from megatron_style.config import STREAMS, ConfigError
from megatron_style.data.bad_data import BadDataCounter, BadFraction
from megatron_style.data.errors import BadSample
from megatron_style.data.raw import RawSample
from megatron_style.data.tar_samples import ReadLimits, read_shard, to_raw

Item = tuple[Union[RawSample, BadSample], list[int]]

# Random draws are keyed by (seed, stream id, what, ...): `what` keeps the uses apart.
_EPOCH_ORDER, _RESAMPLE, _WINDOW_ORDER, _SAMPLE = range(4)


def _key(seed: int, stream: str, what: int, gen: int, *rest: int) -> list[int]:
    """A random key; the resharding generation enters it only once there is one, so that runs
    that were never resharded keep the keys (and the data order) they always had."""
    return [seed, stream_id(stream), what, *([gen] if gen else []), *rest]


def stream_id(name: str) -> int:
    return STREAMS.index(name)


def check_enough_shards(name: str, num_shards: int, num_readers: int, resampled: bool) -> None:
    """Epoch mode gives each reader whole shards: it needs at least one per reader."""
    if not resampled and num_shards < num_readers:
        raise ConfigError(
            f"data.{name}.shards: {num_shards} shards for {num_readers} readers (data-parallel "
            f"ranks x loader workers); in epoch mode each reader needs at least one shard: "
            f"write smaller shards, use fewer data.num_workers, or set data.resampled: true")


class ShardStream:
    """One reader's samples of one stream from tar shards; see the module docstring."""

    def __init__(self, name: str, urls: list[str], reader: int, num_readers: int, seed: int,
                 window: int, resampled: bool, bad: BadDataCounter,
                 state: Optional[dict[str, Any]] = None, epochs: Optional[int] = None,
                 base: Optional[dict[str, Any]] = None, limits: Optional[ReadLimits] = None,
                 rate: Optional[BadFraction] = None) -> None:
        self.name, self.urls, self.reader, self.num_readers = name, list(urls), reader, num_readers
        self.seed, self.window, self.resampled, self.bad = seed, max(1, window), resampled, bad
        self.limits = limits or ReadLimits()
        self.rate = rate  # faults met while reading shards count as bad samples there too
        self.epochs = epochs  # None: forever; tests and evaluation read a fixed number
        if not self.urls:
            raise ConfigError(f"data.{name}.shards: no shards")
        check_enough_shards(name, len(self.urls), num_readers, resampled)
        # Epoch mode: reader r owns positions r, r+R, ... of each epoch's shard permutation.
        self.per_epoch = len(range(reader, len(self.urls), num_readers))
        # After resharding (reshard.py): first positions r, r+R, ... of `rest`, the shards of
        # epoch `epoch0` the old readers had not opened, then whole epochs from epoch0 + 1 on.
        b = base or {}
        self.gen = int(b.get("gen", 0))
        self.epoch0 = int(b.get("epoch0", 0))
        self.rest: Optional[list[int]] = b.get("rest")
        self.n_rest = 0 if self.rest is None else len(range(reader, len(self.rest), num_readers))
        self._order: Optional[tuple[int, list[int]]] = None  # (epoch, its shard order)
        st = state or {}
        self.window_index = int(st.get("window", 0))
        self.start = (int(st.get("shard", 0)), int(st.get("in_shard", 0)))  # window start
        self.taken = int(st.get("taken", 0))     # samples of the window given out
        # How far the shards had been read (see _Cursor.fetch): faults met again while a
        # resumed reader re-reads that far were counted before the save.
        self.fetched: tuple[int, int] = tuple(st.get("fetched", (0, 0)))  # type: ignore[assignment]
        self._mute_until = self.fetched
        self._after: Optional[tuple[int, int]] = None  # position after the current window
        self._window_len = -1
        self._cursor: Optional[_Cursor] = None
        self._empty_in_a_row = 0  # shards that gave no sample: all bad means a broken data set

    # -- position ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the next sample comes from: window number, the window's start (shard number
        in this reader's sequence, samples before it in that shard), samples taken from it."""
        st = {"window": self.window_index, "shard": self.start[0], "in_shard": self.start[1],
              "taken": self.taken, "fetched": list(self.fetched)}
        if self._after is not None and self.taken >= self._window_len:
            # The window is used up: point at the next one, so that a resume reads no old data.
            st.update(window=self.window_index + 1, shard=self._after[0],
                      in_shard=self._after[1], taken=0)
        return st

    def shard_url(self, i: int) -> str:
        """This reader's i-th shard."""
        return self.urls[self.url_index(i)]

    def url_index(self, i: int) -> int:
        """Where this reader's i-th shard is in the shard list."""
        if self.resampled:
            key = _key(self.seed, self.name, _RESAMPLE, self.gen, self.reader, i)
            return int(np.random.default_rng(key).integers(len(self.urls)))
        if self.rest is not None and i < self.n_rest:
            return self.rest[self.reader + i * self.num_readers]
        epoch = self.epoch_of(i)
        j = i - self.epoch_start(epoch)
        return self.epoch_order(epoch)[self.reader + j * self.num_readers]

    def epoch_order(self, epoch: int) -> list[int]:
        """The shard list's order in `epoch` (the same on every reader); after resharding,
        epoch0 holds only the shards in `rest`."""
        if self.rest is not None and epoch == self.epoch0:
            return list(self.rest)
        # Every shard of an epoch asks for the same order: draw it once per epoch, not per
        # shard (resharding asks for every shard an old reader opened).
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, stream_id(self.name), _EPOCH_ORDER, epoch])
            self._order = (epoch, rng.permutation(len(self.urls)).tolist())
        return self._order[1]

    def epoch_start(self, epoch: int) -> int:
        """The number of this reader's first shard of `epoch` (epoch mode)."""
        if self.rest is None:
            return epoch * self.per_epoch
        if epoch <= self.epoch0:
            return 0
        return self.n_rest + (epoch - self.epoch0 - 1) * self.per_epoch

    def epoch_of(self, i: int) -> int:
        if self.resampled:
            return 0
        if self.rest is None:
            return i // self.per_epoch
        if i < self.n_rest:
            return self.epoch0
        return self.epoch0 + 1 + (i - self.n_rest) // self.per_epoch

    def opened(self) -> int:
        """How many of this reader's shards it has read from (the rest of one it has open
        counts as read): everything a resharded resume must not give out again."""
        shard, in_shard = self.start
        n = shard + 1 if (in_shard or self.taken) else shard
        fetched_shard, fetches = self.fetched
        return max(n, fetched_shard + 1) if fetches else n

    # -- reading -------------------------------------------------------------------------
    def _read_window(self) -> list[dict]:
        """Up to `window` raw samples from `self.start` on, within one epoch; sets `_after`."""
        shard, in_shard = self.start
        epoch = self.epoch_of(shard)
        cur = self._cursor
        if cur is None or (cur.shard, cur.read) != (shard, in_shard):
            cur = None
        out: list[dict] = []
        while len(out) < self.window:
            if self.epoch_of(shard) != epoch or (self.epochs is not None and epoch >= self.epochs):
                break  # a window never mixes two epochs, so that an epoch is a clean cut
            if cur is None:
                cur = _Cursor(self, shard, skip=in_shard)
            sample = cur.pop()
            if sample is None:
                self._empty_in_a_row = self._empty_in_a_row + 1 if cur.read == 0 else 0
                if self._empty_in_a_row >= max(2 * len(self.urls), 10):
                    raise RuntimeError(
                        f"stream {self.name!r}: {self._empty_in_a_row} shards in a row gave no "
                        f"sample (reader {self.reader} of {self.num_readers}, last "
                        f"{self.shard_url(shard)!r}); bad data so far: {self.bad.as_dict()}")
                cur, shard, in_shard = None, shard + 1, 0
                continue
            out.append(sample)
            in_shard = cur.read
        if cur is not None and cur.peek() is None:
            cur, shard, in_shard = None, shard + 1, 0  # used up: start the next at its successor
        self._cursor = cur
        self._after = (shard, in_shard)
        return out

    def __iter__(self) -> Iterator[Item]:
        while True:
            window = self._read_window()
            if not window:
                if self.epochs is not None and self.epoch_of(self._after[0]) >= self.epochs:
                    return  # only with a fixed number of epochs
                self.start, self._after = self._after, None  # an epoch with nothing readable
                continue
            self._window_len = len(window)
            rng = np.random.default_rng(_key(self.seed, self.name, _WINDOW_ORDER, self.gen,
                                             self.reader, self.window_index))
            order = rng.permutation(len(window)) if self.window > 1 else np.arange(len(window))
            for j in range(self.taken, len(window)):
                self.taken = j + 1
                key = _key(self.seed, self.name, _SAMPLE, self.gen, self.reader,
                           self.window_index, j)
                try:
                    yield to_raw(self.name, window[int(order[j])], self.limits), key
                except BadSample as e:
                    yield e, key
            self.window_index += 1
            self.start, self.taken = self._after, 0
            self._after, self._window_len = None, -1


class _Cursor:
    """An open shard of a ShardStream: the reader's `shard`-th, `read` samples taken from it,
    one sample of look-ahead (to know whether it is used up)."""

    _END = object()

    def __init__(self, stream: ShardStream, shard: int, skip: int) -> None:
        self.stream, self.shard, self.read, self.fetches = stream, shard, 0, 0
        self._it = read_shard(stream.shard_url(shard), stream.bad, stream.limits)
        self._next: Any = None
        for _ in range(skip):  # re-read up to where the reader stood
            if self.pop() is None:
                break

    def fetch(self) -> Any:
        """The next sample from the tar (or _END). Faults met while fetching are counted unless
        this fetch had already been made before a resume."""
        st = self.stream
        st.bad.muted = (self.shard, self.fetches) < tuple(st._mute_until)
        before = st.bad.added
        try:
            sample = next(self._it, self._END)
        finally:
            st.bad.muted = False
        self.fetches += 1
        st.fetched = max(tuple(st.fetched), (self.shard, self.fetches))  # type: ignore[assignment]
        if st.rate is not None:
            for _ in range(st.bad.added - before):  # members, shards skipped in this fetch
                st.rate.record(True, st.bad.counts, st.shard_url(self.shard))
        return sample

    def peek(self) -> Optional[dict]:
        if self._next is None:
            self._next = self.fetch()
        return None if self._next is self._END else self._next

    def pop(self) -> Optional[dict]:
        sample = self.peek()
        if sample is not None:
            self._next = None
            self.read += 1
        return sample


class DemoStream:
    """One reader's samples of one stream from the index-based demo generator: indices
    start + r, start + r + R, ... (start is 0 unless resharded)."""

    def __init__(self, name: str, get: Callable[[str, int], RawSample], reader: int,
                 num_readers: int, seed: int, state: Optional[dict[str, Any]] = None,
                 base: Optional[dict[str, Any]] = None) -> None:
        self.name, self.get, self.reader, self.num_readers, self.seed = name, get, reader, num_readers, seed
        self.count = int((state or {}).get("count", 0))
        self.gen = int((base or {}).get("gen", 0))
        self.first = int((base or {}).get("start", 0)) + reader

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def __iter__(self) -> Iterator[Item]:
        while True:
            n = self.count
            self.count += 1
            key = _key(self.seed, self.name, _SAMPLE, self.gen, self.reader, n)
            try:
                yield self.get(self.name, self.first + n * self.num_readers), key
            except BadSample as e:
                yield e, key
