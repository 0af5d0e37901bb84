"""The demo path of build_train_loader: same mixing/packing as shards, index-based state."""
import pytest

from megatron_style.config import ConfigError
from megatron_style.data.loader import build_train_loader
from streaming_helpers import StandInProcessor, batch_record, demo_get, make_cfg


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_split_by_weights_is_the_same_every_batch_and_ranks_are_disjoint():
    cfg = make_cfg("demo", weights={"image": 2, "text": 1, "pair": 1}, micro_batch_size=5,
                   num_workers=2)
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank, 2, StandInProcessor(cfg), demo=demo_get)
        for b in take(loader, 4):
            # largest remainder: 5 * (2, 1, 1) / 4 = (2.5, 1.25, 1.25) -> (3, 1, 1)
            assert b.kind_counts() == {"image": 3, "text": 1, "pair": 1}
            seen += b.sources
    assert len(seen) == len(set(seen)) == 2 * 4 * 5


def test_zero_weight_stream_is_off_and_a_starved_stream_is_an_error():
    cfg = make_cfg("demo", weights={"image": 1, "text": 0, "pair": 1}, micro_batch_size=4)
    b = take(build_train_loader(cfg, 0, 1, StandInProcessor(cfg), demo=demo_get), 1)[0]
    assert b.kind_counts() == {"image": 2, "text": 0, "pair": 2}
    with pytest.raises(ConfigError, match="micro_batch_size.*'pair'"):  # at config time
        make_cfg("demo", micro_batch_size=2)


def test_demo_resume_continues_with_the_next_unseen_batch():
    cfg = make_cfg("demo", micro_batch_size=3, num_workers=2)
    whole = [batch_record(b) for b in
             take(build_train_loader(cfg, 0, 1, StandInProcessor(cfg), demo=demo_get), 7)]
    first = build_train_loader(cfg, 0, 1, StandInProcessor(cfg), demo=demo_get)
    head = [batch_record(b) for b in take(first, 3)]
    state = first.state_dict()
    second = build_train_loader(cfg, 0, 1, StandInProcessor(cfg), demo=demo_get)
    second.load_state_dict(state)
    tail = [batch_record(b) for b in take(second, 4)]
    assert head + tail == whole
    assert second.bad_sample_counts() == {}


def test_real_demo_source_and_processor():
    from megatron_style.data.processor import SampleProcessor
    from megatron_style.data.build_tokenizers import build_text_tokenizer
    cfg = make_cfg("demo", micro_batch_size=3)
    processor = SampleProcessor(cfg, build_text_tokenizer(cfg))
    b = take(build_train_loader(cfg, 0, 1, processor), 2)[1]
    b_cfg = cfg.model
    assert b.kind_counts() == {"image": 1, "text": 1, "pair": 1}
    assert b.sources[0].startswith("demo/image/")
    assert b.images.shape[1:] == (3, b_cfg.img_size, b_cfg.img_size)


def test_both_loaders_have_the_interface_the_trainer_uses():
    from megatron_style.data.batch_loader import BatchLoader
    from megatron_style.data.synthetic_loader import SyntheticLoader
    cfg = make_cfg("demo", micro_batch_size=3)
    assert isinstance(build_train_loader(cfg, 0, 1, StandInProcessor(cfg), demo=demo_get), BatchLoader)
    assert isinstance(SyntheticLoader(cfg, 0, 1), BatchLoader)
