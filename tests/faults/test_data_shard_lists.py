"""Lost and removed shards: a few shards a pattern or listing names but that are gone warn and
are counted when their turn comes (too many stop start-up, naming the count and the setting);
a shard list changed on purpose resumes with data.allow_shard_list_change, carrying the
position over (nothing of the epoch read twice, the removed shard never read), and without
the flag the refusal names it."""
import collections
import logging
import os

import pytest

from megatron_style.config import ConfigError
from megatron_style.data.bad_data import BadDataCounter
from megatron_style.data.loader import build_train_loader
from megatron_style.data.shards import check_data_paths
from megatron_style.data.streams import ShardStream
from tests.data.streaming_helpers import (StandInProcessor, key_of, make_cfg,
                                                    write_pair_shards, write_text_shards)

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """150 one-sample text shards, texts-00000.tar .. texts-00149.tar."""
    return write_text_shards(str(tmp_path_factory.mktemp("many")), [1] * 150)


def test_a_few_lost_shards_warn_and_are_counted_when_read(many, tmp_path, caplog):
    folder = os.path.dirname(many[0])
    lost = many[7]
    os.rename(lost, lost + ".gone")
    try:
        listing = tmp_path / "list.txt"
        listing.write_text("".join(p + "\n" for p in many))
        for spec in (os.path.join(folder, "texts-{00000..00149}.tar"), str(listing)):
            caplog.clear()
            with caplog.at_level(logging.WARNING, "megatron_style.data"):
                urls = check_data_paths(make_cfg(text=spec))["text"]
            assert urls == many  # the lost one stays in the list: the saved position keeps
            assert "1 of the 150 shards do not exist" in caplog.text
            assert "data.max_missing_shards_fraction=0.01" in caplog.text
        bad = BadDataCounter()
        stream = ShardStream("text", many, 0, 1, 0, 1, False, bad, epochs=1)
        assert len([raw for raw, _ in stream]) == 149 and bad.as_dict() == {"unreadable_shard": 1}
    finally:
        os.rename(lost + ".gone", lost)


def test_too_many_lost_shards_stop_start_up_naming_count_and_threshold(many):
    folder = os.path.dirname(many[0])
    pattern = os.path.join(folder, "texts-{00000..00151}.tar")  # 2 of 152 beyond the set
    with pytest.raises(ConfigError, match=r"data.text.shards: 2 of the 152 shards do not exist "
                                          r".*more than data.max_missing_shards_fraction=0.01"):
        check_data_paths(make_cfg(text=pattern))
    assert len(check_data_paths(make_cfg(text=pattern, max_missing_shards_fraction=0.02))["text"]) == 152
    with pytest.raises(ConfigError, match="matches no shard files"):  # a pattern naming nothing
        check_data_paths(make_cfg(text=os.path.join(folder, "other-{0..9}.tar")))


SIZES = [6] * 10


@pytest.fixture(scope="module")
def ten(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ten"))
    return write_pair_shards(d, SIZES + [6], prefix="pairs")  # the 11th is added later


def shard_of(source):
    return int(key_of(source).split("_")[0])


def file_no(url):
    return int(os.path.basename(url)[len("pairs-"):-len(".tar")])


def take(loader, batches):
    it = iter(loader)
    return [s for _ in range(batches) for s in next(it).sources]


def test_changed_shard_list_resumes_only_with_the_flag_and_carries_the_position(ten, caplog):
    old_urls, new_extra = ten[:10], ten[10]
    cfg = make_cfg(pair=old_urls, micro_batch_size=2, shuffle_buffer=4, num_workers=1)
    first = build_train_loader(cfg, 0, 1, StandInProcessor(cfg))
    before = take(first, 8)  # 16 samples: about 3 of the 10 shards opened
    state = first.state_dict()
    opened = {shard_of(s) for s in before}
    unread = set(range(10)) - opened
    removed = sorted(unread)[0]                # remove one shard nobody read yet ...
    kept = [u for i, u in enumerate(old_urls) if i != removed] + [new_extra]  # ... add one

    strict = make_cfg(pair=kept, micro_batch_size=2, shuffle_buffer=4, num_workers=1)
    loader = build_train_loader(strict, 0, 1, StandInProcessor(strict))
    assert not loader.layout_changed(state)
    with pytest.raises(ValueError, match=r"shards: saved .*set data.allow_shard_list_change: "
                                         r"true to carry the position over"):
        loader.load_state_dict(state)

    allowed = make_cfg(pair=kept, micro_batch_size=2, shuffle_buffer=4, num_workers=1,
                       allow_shard_list_change=True)
    loader = build_train_loader(allowed, 0, 1, StandInProcessor(allowed))
    assert loader.layout_changed(state)  # the trainer then takes the resharding path
    with caplog.at_level(logging.WARNING, "megatron_style.data"):
        loader.load_state_dict(state)    # (one rank: the direct call goes the same way)
    assert "shard list changed from 10 to 10 shards (data.allow_shard_list_change)" in caplog.text
    base = loader.state_dict()["base"]["pair"]
    rest = {file_no(kept[i]) for i in base["rest"]}
    assert rest == (unread - {removed}) | {10}
    # the rest of epoch 0: each unread shard once, nothing read before, not the removed one
    after = take(loader, 6 * len(rest) // 2)
    counts = collections.Counter(key_of(s) for s in after)
    assert {shard_of(s) for s in after} == rest and max(counts.values()) == 1
    assert not {key_of(s) for s in after} & {key_of(s) for s in before}


def test_changed_shard_list_in_resampled_mode_draws_afresh(ten):
    cfg = make_cfg(pair=ten[:10], micro_batch_size=2, resampled=True)
    first = build_train_loader(cfg, 0, 1, StandInProcessor(cfg))
    take(first, 3)
    new_cfg = make_cfg(pair=ten[1:], micro_batch_size=2, resampled=True,
                       allow_shard_list_change=True)
    loader = build_train_loader(new_cfg, 0, 1, StandInProcessor(new_cfg))
    loader.load_state_dict(first.state_dict())
    assert loader.state_dict()["base"]["pair"] == {"gen": 1, "list_changed": [10, 10]}
    assert 0 not in {shard_of(s) for s in take(loader, 10)}
