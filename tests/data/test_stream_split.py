"""Splitting by node and by worker: one epoch yields every sample exactly once."""
import collections

from megatron_style.data.bad_data import BadDataCounter
from megatron_style.data.loader import build_train_loader
from megatron_style.data.streams import ShardStream
from streaming_helpers import StandInProcessor, key_of, make_cfg, write_pair_shards


def read_keys(paths, reader, readers, epochs=1, resampled=False, window=4, seed=0):
    st = ShardStream("pair", paths, reader, readers, seed, window, resampled, BadDataCounter(),
                     epochs=epochs)
    return [key_of(raw.source) for raw, _ in st]


def test_two_nodes_two_workers_one_epoch_every_sample_once(tmp_path):
    sizes = [3, 5, 4, 6, 2, 7, 1]  # uneven shards, 7 shards over 4 readers
    paths = write_pair_shards(str(tmp_path), sizes)
    per_reader = [read_keys(paths, r, 4) for r in range(4)]  # reader = rank * 2 + worker
    assert all(per_reader)
    keys = [k for ks in per_reader for k in ks]
    assert len(keys) == sum(sizes) and len(set(keys)) == sum(sizes)
    # a second epoch reshuffles the shards over the readers but again yields each sample once
    two = [k for r in range(4) for k in read_keys(paths, r, 4, epochs=2)]
    assert set(collections.Counter(two).values()) == {2}
    second = [read_keys(paths, r, 4, epochs=2)[len(per_reader[r]):] for r in range(4)]
    assert [set(s) for s in second] != [set(s) for s in per_reader]


def test_window_shuffles_and_is_deterministic(tmp_path):
    paths = write_pair_shards(str(tmp_path), [8, 8])
    a = read_keys(paths, 0, 1, window=8)
    assert a == read_keys(paths, 0, 1, window=8)
    assert sorted(a) == sorted(read_keys(paths, 0, 1, window=1))
    assert a != read_keys(paths, 0, 1, window=1)
    assert a != read_keys(paths, 0, 1, window=8, seed=1)


def test_resampled_readers_draw_their_own_shards(tmp_path):
    paths = write_pair_shards(str(tmp_path), [2] * 6)
    def first(r):
        st = iter(ShardStream("pair", paths, r, 4, 0, 4, True, BadDataCounter()))
        return [key_of(next(st)[0].source) for _ in range(20)]
    seqs = [first(r) for r in range(4)]
    assert seqs[0] == first(0)
    assert len({tuple(s) for s in seqs}) == 4
    assert len({k.split("_")[0] for s in seqs for k in s}) > 3  # draws from many shards


def test_loader_two_ranks_two_workers_one_epoch_exactly_once(tmp_path):
    # 8 shards of 6 pairs: each of the 4 readers owns 2 shards = 12 samples = 3 batches of 4
    paths = write_pair_shards(str(tmp_path), [6] * 8)
    cfg = make_cfg(pair=paths, num_workers=2, micro_batch_size=4, shuffle_buffer=5)
    seen = []
    for rank in range(2):
        it = iter(build_train_loader(cfg, rank, 2, StandInProcessor(cfg)))
        for _ in range(6):
            seen += [key_of(s) for s in next(it).sources]
    assert len(seen) == 48 and len(set(seen)) == 48
