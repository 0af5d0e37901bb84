"""Carry the data position over to another number of readers (ranks x loader workers).

A saved loader position is exact only for the layout that wrote it: reader r of R owns the
shards r, r+R, ... of an epoch, so a job requeued on fewer nodes, or restarted with more loader
workers, has readers that own other shards. Starting those from the beginning would replay the
start of the data set; instead the trainer reads every old rank's loader state and this module
derives, per stream, a *base* that all new readers share (stored in the loader state as "base"):

  - epoch mode: e0, the epoch of the slowest old reader, and `rest`, the shards of e0 that no old
    reader had opened, in e0's shard order. New reader r' of R' reads rest[r'::R'], then goes on
    with epoch e0 + 1 as usual. No sample of e0 is read twice. Skipped: the unread part of the
    shards the old readers had open (one or two per reader and stream: a shuffle window can
    span two shards). Read once more in e0 + 1: shards of e0 + 1 that faster old readers had
    already opened.
  - resampled mode: shards are drawn with replacement, so there is no epoch to finish; the base
    bumps a generation number that enters every random key, so that the new readers draw afresh
    rather than replaying the old readers' draws from the start.
  - demo: `start`, the first demo index some old reader had not reached; new reader r' reads
    start + r', start + r' + R', ... Nothing is skipped; repeated at most the old readers'
    spread (about one batch each).

A changed shard list (data.allow_shard_list_change: a bad shard removed, shards added) goes the
same way. In epoch mode shards are matched by file name (rank 0's saved state names the old
list): `rest` is epoch e0 of the new list without the shards the old readers had opened, so
new shards are read in e0 and removed ones never; resampled mode draws afresh from the new list.

Bad-sample counts keep their totals: the new data-parallel rank 0 carries the old sum.
"""
from __future__ import annotations

import base64
import os
import zlib
from collections import Counter
from typing import Any, Iterator, Optional

from megatron_style.config import STREAMS
from megatron_style.data.bad_data import BadDataCounter, sum_counts
from megatron_style.data.streams import ShardStream

#: The plan keys that may differ between the saving and the resuming run.
LAYOUT_KEYS = ("dp_rank", "dp_world", "num_workers")


def data_differences(mine: dict[str, Any], saved: dict[str, Any],
                     ignore: tuple[str, ...] = ()) -> list[str]:
    """The plan keys (LoaderPlan.describe()) whose values differ, except those in `ignore`."""
    return [k for k in sorted(set(mine) | set(saved))
            if k not in ignore and mine.get(k) != saved.get(k)]


def one_state_per_rank(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The old data-parallel ranks' loader states, in rank order, one each (tensor-parallel
    ranks of one data-parallel rank save the same position). Refuses an incomplete set."""
    by_rank: dict[int, dict[str, Any]] = {}
    for s in states:
        by_rank.setdefault(int(s["plan"]["dp_rank"]), s)
    worlds = {int(s["plan"]["dp_world"]) for s in by_rank.values()}
    if len(worlds) != 1:
        raise ValueError(f"the checkpoint's loader states disagree on the data-parallel size: "
                         f"{sorted(worlds)}")
    world = worlds.pop()
    missing = [r for r in range(world) if r not in by_rank]
    if missing:
        raise ValueError(f"the checkpoint has no loader state for data-parallel ranks {missing} "
                         f"of {world}: it is incomplete")
    return [by_rank[r] for r in range(world)]


def _old_readers(states: list[dict[str, Any]], stream: str) -> Iterator[tuple[int, int, Optional[dict]]]:
    """(reader id, readers, that reader's saved position in `stream` or None) of the old run."""
    for s in states:
        p = s["plan"]
        W = int(p["num_workers"])
        for w in range(W):
            worker = s["workers"][w] if w < len(s["workers"]) else None
            pos = (worker or {}).get("streams", {}).get(stream)
            yield int(p["dp_rank"]) * W + w, int(p["dp_world"]) * W, pos


def pack_names(names: list[str]) -> str:
    """Shard file names, compressed for the loader state (a 200k-shard list is ~100 KB)."""
    return base64.b64encode(zlib.compress("\n".join(names).encode(), 6)).decode("ascii")


def unpack_names(packed: str) -> list[str]:
    text = zlib.decompress(base64.b64decode(packed)).decode()
    return text.split("\n") if text else []


def _name_keys(names: list[str]) -> list[tuple[str, int]]:
    """(file name, its occurrence number): two folders may both hold a 00000.tar."""
    seen: Counter[str] = Counter()
    keys = []
    for n in names:
        keys.append((n, seen[n]))
        seen[n] += 1
    return keys


def _list_changed(plan, stream: str, states) -> Optional[tuple[int, int]]:
    """(old, new) numbers of shards when the saved run had another shard list, else None."""
    saved = states[0]["plan"].get("shards", {}).get(stream)
    mine = plan.describe()["shards"][stream]
    return None if saved is None or list(saved) == list(mine) else (int(saved[0]), int(mine[0]))


def _old_names(stream: str, states) -> list[str]:
    packed = states[0].get("shard_names", {}).get(stream)
    if packed is None:
        raise ValueError(f"stream {stream!r}: the shard list changed, but the checkpoint does not "
                         "name its old shards (it predates data.allow_shard_list_change), so "
                         "the shards already read cannot be told apart; resume with the old "
                         "shard list")
    return unpack_names(packed)


def _shard_base(plan, stream: str, states, old_base: Optional[dict]) -> dict[str, Any]:
    gen = int((old_base or {}).get("gen", 0)) + 1
    changed = _list_changed(plan, stream, states)
    note = {"list_changed": list(changed)} if changed else {}
    if plan.resampled:
        return {"gen": gen, **note}
    # The old readers' positions are indices into the list they read.
    old_urls = _old_names(stream, states) if changed else plan.urls[stream]
    olds = [ShardStream(stream, old_urls, r, R, plan.seed, plan.window, False,
                        BadDataCounter(), pos, base=old_base)
            for r, R, pos in _old_readers(states, stream)]
    e0 = min(st.epoch_of(st.opened()) for st in olds)
    opened = set()
    for st in olds:
        first, end = st.epoch_start(e0), min(st.opened(), st.epoch_start(e0 + 1))
        opened.update(st.url_index(i) for i in range(first, end))
    unread = [u for u in olds[0].epoch_order(e0) if u not in opened]
    if not changed:
        return {"gen": gen, "epoch0": e0, "rest": unread}
    old_keys = _name_keys(old_urls)
    unread_keys, known = {old_keys[u] for u in unread}, set(old_keys)
    new_keys = _name_keys([os.path.basename(u) for u in plan.urls[stream]])
    order = ShardStream(stream, plan.urls[stream], 0, 1, plan.seed, plan.window, False,
                        BadDataCounter()).epoch_order(e0)
    rest = [i for i in order if new_keys[i] in unread_keys or new_keys[i] not in known]
    return {"gen": gen, "epoch0": e0, "rest": rest, **note}


def _demo_base(stream: str, states, old_base: Optional[dict]) -> dict[str, Any]:
    start = int((old_base or {}).get("start", 0))
    first_unread = min(start + r + int((pos or {}).get("count", 0)) * R
                       for r, R, pos in _old_readers(states, stream))
    return {"gen": int((old_base or {}).get("gen", 0)) + 1, "start": first_unread}


def reshard(states: list[dict[str, Any]], plan) -> dict[str, Any]:
    """The loader state for `plan` (a LoaderPlan of the new layout) that continues where the old
    ranks' loader `states` (all of them) stood. Refuses states of other data settings."""
    states = one_state_per_rank(states)
    mine = plan.describe()
    allowed = LAYOUT_KEYS + (("shards",) if plan.allow_shard_list_change else ())
    for s in states:
        diff = data_differences(mine, s["plan"], ignore=allowed)
        if diff:
            what = "; ".join(f"{k}: saved {s['plan'].get(k)!r}, now {mine.get(k)!r}" for k in diff)
            hint = (" (and the shard list, with data.allow_shard_list_change: true)"
                    if "shards" in diff else "")
            raise ValueError(f"the data loader state was saved with other data settings ({what}); "
                             "only the number of data-parallel ranks and data.num_workers may "
                             f"change on resume{hint}")
    old_base = states[0].get("base", {})
    base = {}
    for stream in STREAMS:
        if plan.counts[stream] == 0:
            continue
        if plan.source == "demo":
            base[stream] = _demo_base(stream, states, old_base.get(stream))
        else:
            base[stream] = _shard_base(plan, stream, states, old_base.get(stream))
    bad = sum_counts([w["bad"] for s in states for w in s["workers"] if w])
    workers: list[Optional[dict]] = [None] * plan.num_workers
    if plan.dp_rank == 0 and bad:
        workers[0] = {"batches": 0, "bad": bad, "streams": {}}
    return {"version": states[0]["version"], "plan": mine, "consumed": 0, "workers": workers,
            "base": base}


def describe_base(base: dict[str, Any], num_urls: dict[str, list[str]]) -> str:
    """One log line per stream: where the new readers start."""
    parts = []
    for stream, b in base.items():
        if "list_changed" in b:
            old, new = b["list_changed"]
            parts.append(f"{stream}: shard list changed from {old} to {new} shards "
                         "(data.allow_shard_list_change), position carried over")
        if "rest" in b:
            n = len(num_urls.get(stream, []))
            parts.append(f"{stream}: epoch {b['epoch0']}, {len(b['rest'])} of {n} shards unread")
        elif "start" in b:
            parts.append(f"{stream}: demo sample {b['start']}")
        else:
            parts.append(f"{stream}: fresh draws (resampled, generation {b['gen']})")
    return "; ".join(parts)
