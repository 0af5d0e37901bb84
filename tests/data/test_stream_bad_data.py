"""Bad data is skipped, counted per reason, and never stops the stream."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from megatron_style.data.bad_data import BadDataCounter
from megatron_style.data.loader import build_train_loader, good_samples
from megatron_style.data.streams import ShardStream
from streaming_helpers import (StandInProcessor, bad_counts_after_resume, key_of, make_cfg,
                               pair, png_bytes, truncate_inside_member, write_tar)

EXPECTED = {"bad_image": 2, "empty_text": 2, "bad_utf8": 1, "missing_text": 1,
            "missing_image": 1, "truncated_tar": 2, "unreadable_shard": 2}
GOOD = 4 + 3 + 4 + 3 + 2


def noisy_jpeg(size=64):
    a = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("faulty"))
    a = [pair(f"a{j}", j) for j in range(6)]
    a[1]["jpg"] = os.urandom(500)          # not an image at all
    a[3]["jpg"] = noisy_jpeg()[:1500]       # a JPEG cut short: fails when decoded
    b = [pair(f"b{j}", j) for j in range(6)]
    b[0]["txt"], b[2]["txt"], b[4]["txt"] = "", "  \n ", b"\xff\xfe caption"
    c = [pair(f"c{j}", j) for j in range(6)]
    del c[1]["txt"]
    c[2] = {"__key__": "c2", "txt": "no image here", "json": b"{}"}
    c[5] = {"__key__": "c5", "png": png_bytes(5), "txt": "a png is fine"}
    d_ = [pair(f"d{j}", j) for j in range(6)]
    e = [pair(f"e{j}", j) for j in range(6)]
    paths = [write_tar(os.path.join(d, f"faulty-{k}.tar"), s)
             for k, s in enumerate((a, b, c, d_, e))]
    truncate_inside_member(paths[3], "d3.jpg")  # d0..d2 are whole, d3 never started
    truncate_inside_member(paths[4], "e2.txt", into=3)  # e2 has its image but not all its text
    with open(os.path.join(d, "faulty-5.tar"), "wb") as f:
        f.write(os.urandom(3000))               # not a tar
    open(os.path.join(d, "faulty-6.tar"), "wb").close()  # empty file
    return sorted(os.path.join(d, f) for f in os.listdir(d))


def processors(cfg):
    yield StandInProcessor(cfg)
    from megatron_style.data.processor import SampleProcessor
    from megatron_style.data.build_tokenizers import build_text_tokenizer
    yield SampleProcessor(cfg, build_text_tokenizer(make_cfg("demo")))


def test_one_epoch_with_planted_faults_streams_to_the_end_with_counts(faulty):
    cfg = make_cfg(pair=faulty)
    for processor in processors(cfg):
        bad = BadDataCounter()
        stream = ShardStream("pair", faulty, 0, 1, 0, 5, False, bad, epochs=1)
        got = [key_of(s.source) for s in good_samples("pair", iter(stream), processor, bad)]
        assert sorted(got) == sorted(["a0", "a2", "a4", "a5", "b1", "b3", "b5", "c0", "c3", "c4",
                                      "c5", "d0", "d1", "d2", "e0", "e1"])
        assert bad.as_dict() == EXPECTED, type(processor).__name__


def test_counts_reach_the_main_process_and_survive_resume_exactly(faulty):
    cfg = make_cfg(pair=faulty, num_workers=2, micro_batch_size=2, shuffle_buffer=3)
    loader = build_train_loader(cfg, 0, 1, StandInProcessor(cfg))
    it = iter(loader)
    per_batch = []
    for _ in range(GOOD):  # about two epochs (the two readers' shares differ)
        next(it)
        per_batch.append(loader.bad_sample_counts())
    final = per_batch[-1]
    assert set(final) == set(EXPECTED)
    assert all(EXPECTED[r] <= final[r] <= 3 * EXPECTED[r] for r in EXPECTED), final
    # Resuming anywhere (a window, a shard end, inside the truncated shard) neither loses nor
    # recounts a fault: the counts match the uninterrupted run's batch for batch.
    serial = make_cfg(pair=faulty, num_workers=0, micro_batch_size=1, shuffle_buffer=2)
    whole = build_train_loader(serial, 0, 1, StandInProcessor(serial))
    it = iter(whole)
    want = []
    for _ in range(2 * GOOD):
        next(it)
        want.append(whole.bad_sample_counts())
    for k in range(1, 2 * GOOD - 1, 2):
        assert bad_counts_after_resume(serial, k) == want[k + 1], k
