"""Resuming the data position on another number of readers (data-parallel ranks x loader
workers): epoch mode reads the rest of the epoch with nothing read twice, resampled mode draws
afresh instead of replaying the start, demo goes on from the first unread index, bad-sample
totals are kept, and other data settings are still refused."""
import collections

import pytest

from megatron_style.data.bad_data import BadDataCounter
from megatron_style.data.loader import build_train_loader
from megatron_style.data.streams import ShardStream
from streaming_helpers import (StandInProcessor, demo_get, key_of, make_cfg, write_pair_shards,
                               write_tar)

SIZES = [6] * 10  # 10 shards of 6 pairs: 60 samples an epoch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_pair_shards(str(tmp_path_factory.mktemp("reshard")), SIZES)


def loaders(cfg, world, demo=None):
    return [build_train_loader(cfg, r, world, StandInProcessor(cfg), demo=demo)
            for r in range(world)]


def run(loader_list, batches):
    """Take `batches` micro-batches from every loader; the sample sources, in order."""
    seen = []
    for loader in loader_list:
        it = iter(loader)
        for _ in range(batches):
            seen += next(it).sources
    return seen


def shard_of(source):
    return int(key_of(source).split("_")[0])


def test_epoch_mode_reads_the_rest_of_the_epoch_once(shards):
    cfg = make_cfg(pair=shards, micro_batch_size=2, shuffle_buffer=4, num_workers=2)
    old = loaders(cfg, 2)  # 4 readers, 2 or 3 shards each
    before = run(old, 3)
    states = [ld.state_dict() for ld in old]

    new_cfg = make_cfg(pair=shards, micro_batch_size=2, shuffle_buffer=4, num_workers=1)
    new = loaders(new_cfg, 3)  # 3 readers
    for ld in new:
        ld.load_resharded(states)
    base = new[0].state_dict()["base"]["pair"]
    assert base["epoch0"] == 0 and base["gen"] == 1
    opened = {shard_of(s) for s in before}
    # the shards no old reader opened, in the epoch's order, and no other
    assert sorted(base["rest"]) == sorted(set(range(len(SIZES))) - opened)
    assert len(base["rest"]) >= 3  # the test means something: most shards were still unread

    # each new reader reads its part of the rest, then starts epoch 1
    rest_samples = []
    for r in range(3):
        st = ShardStream("pair", shards, r, 3, cfg.data.seed, 4, False, BadDataCounter(),
                         base=base, epochs=1)
        rest_samples += [key_of(raw.source) for raw, _ in st]
    assert len(rest_samples) == 6 * len(base["rest"]) == len(set(rest_samples))
    assert not set(rest_samples) & {key_of(s) for s in before}

    # the loaders themselves start with those rest shards
    after = run(new, 2)
    assert {shard_of(s) for s in after} <= set(base["rest"])
    assert not {key_of(s) for s in after} & {key_of(s) for s in before}


def test_resharding_twice_keeps_what_the_first_base_left_out(shards):
    cfg = make_cfg(pair=shards, micro_batch_size=2, shuffle_buffer=4, num_workers=1)
    first = loaders(cfg, 2)
    seen = run(first, 2)
    second = loaders(cfg, 3)
    for ld in second:
        ld.load_resharded([x.state_dict() for x in first])
    seen += run(second, 2)
    third = loaders(cfg, 1)
    third[0].load_resharded([x.state_dict() for x in second])
    base = third[0].state_dict()["base"]["pair"]
    assert base["gen"] == 2 and base["epoch0"] == 0
    assert set(base["rest"]).isdisjoint({shard_of(s) for s in seen})
    st = ShardStream("pair", shards, 0, 1, cfg.data.seed, 4, False, BadDataCounter(), base=base,
                     epochs=1)
    rest = [key_of(raw.source) for raw, _ in st]
    assert len(rest) == len(set(rest)) and not set(rest) & {key_of(s) for s in seen}
    # over the three layouts nothing of epoch 0 came twice
    counts = collections.Counter([key_of(s) for s in seen] + rest)
    assert max(counts.values()) == 1


def test_resampled_mode_draws_afresh_rather_than_replaying(shards):
    cfg = make_cfg(pair=shards, micro_batch_size=2, shuffle_buffer=4, num_workers=1,
                   resampled=True)
    old = loaders(cfg, 2)
    run(old, 3)
    new = loaders(cfg, 1)
    new[0].load_resharded([ld.state_dict() for ld in old])
    assert new[0].state_dict()["base"]["pair"] == {"gen": 1}
    fresh_start = run(loaders(cfg, 1), 4)
    assert run(new, 4) != fresh_start


def test_demo_goes_on_from_the_first_unread_index():
    cfg = make_cfg("demo", micro_batch_size=3, num_workers=1)
    old = loaders(cfg, 2, demo_get)
    before = run(old, 4)  # indices 0..7 of each stream, 4 per rank
    new_cfg = make_cfg("demo", micro_batch_size=3, num_workers=2)
    new = loaders(new_cfg, 1, demo_get)
    new[0].load_resharded([ld.state_dict() for ld in old])
    after = run(new, 4)
    index = lambda s: int(s.rsplit("/", 1)[1])  # noqa: E731
    for kind in ("image", "text", "pair"):
        got = sorted(index(s) for s in after if f"/{kind}/" in s)
        assert got == list(range(8, 12))
        assert sorted(index(s) for s in before if f"/{kind}/" in s) == list(range(8))


def test_bad_sample_totals_survive_and_other_data_settings_are_refused(tmp_path, shards):
    bad = [{"__key__": f"009_{j:04d}", "jpg": b"not a jpeg", "txt": "x"} for j in range(6)]
    paths = shards[:9] + [write_tar(str(tmp_path / "bad.tar"), bad)]
    cfg = make_cfg(pair=paths, micro_batch_size=3, shuffle_buffer=6, num_workers=1)
    old = loaders(cfg, 2)
    it = [iter(ld) for ld in old]
    for _ in range(10):  # every reader goes through its 5 shards
        for i in it:
            next(i)
    total = sum(sum(ld.bad_sample_counts().values()) for ld in old)
    assert total > 0  # the bad shard was read
    states = [ld.state_dict() for ld in old]
    new = loaders(cfg, 3)
    for ld in new:
        ld.load_resharded(states)
    assert sum(sum(ld.bad_sample_counts().values()) for ld in new) == total
    assert new[0].bad_sample_counts() == {"bad_image": total}

    other = make_cfg(pair=shards, micro_batch_size=3, shuffle_buffer=6, num_workers=1, seed=7)
    with pytest.raises(ValueError, match="seed: saved 0, now 7"):
        loaders(other, 1)[0].load_resharded(states)
    with pytest.raises(ValueError, match=r"ranks \[1\] of 2"):
        loaders(cfg, 1)[0].load_resharded(states[:1])


def test_layout_change_is_recognised(shards):
    cfg = make_cfg(pair=shards, num_workers=2)
    state = loaders(cfg, 1)[0].state_dict()
    assert not loaders(cfg, 1)[0].layout_changed(state)
    assert loaders(make_cfg(pair=shards, num_workers=1), 1)[0].layout_changed(state)
    assert not loaders(make_cfg(pair=shards, num_workers=1, seed=3), 1)[0].layout_changed(state)
