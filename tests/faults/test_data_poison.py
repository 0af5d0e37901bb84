"""One poison input must not kill a run (and with exact resume, every restart): a tar member
that claims a gibibyte, a shard whose command fails, an image that breaks its decoder in an
unforeseen way, a whole shard of unusable samples. Each is injected for real, skipped, counted
by reason, and the samples after it are delivered; only a data set that is mostly bad stops
the run, with a message naming the setting."""
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from megatron_style.data.bad_data import BadDataCounter
from megatron_style.data.loader import build_train_loader, good_samples
from megatron_style.data.streams import ShardStream
from megatron_style.data.tar_samples import ReadLimits
from tests.data.streaming_helpers import (StandInProcessor, bad_counts_after_resume,
                                                    jpeg_bytes, key_of,
                                                    make_cfg, make_sparse, pair, run_measured,
                                                    write_members, write_tar,
                                                    write_text_shards)

pytestmark = pytest.mark.faults

#: Peak resident memory allowed to a child that imports torch (~230 MB) and reads the poison.
MEMORY_BOUND_MB = 600


def delivered(urls, kind="text", processor=None, **limits):
    """(keys of the samples delivered in one epoch, bad-sample counts)."""
    bad = BadDataCounter()
    cfg = make_cfg(**{kind: urls})
    stream = ShardStream(kind, urls, 0, 1, 0, 1, False, bad, epochs=1, **limits)
    samples = good_samples(kind, iter(stream), processor or StandInProcessor(cfg), bad)
    return [key_of(s.source) for s in samples], bad.as_dict()


READ_IN_CHILD = """
import json
from tests.data.streaming_helpers import cap_address_space, key_of, make_cfg
from megatron_style.data.bad_data import BadDataCounter
from megatron_style.data.loader import good_samples
from megatron_style.data.processor import SampleProcessor
from megatron_style.data.streams import ShardStream
from megatron_style.data.build_tokenizers import build_text_tokenizer
kind, url, headroom = {kind!r}, {url!r}, {headroom}
cfg = make_cfg(**{{kind: [url]}})
processor = SampleProcessor(cfg, build_text_tokenizer(make_cfg("demo")))
cap_address_space(headroom)  # a runaway read fails here instead of taking the machine
bad = BadDataCounter()
stream = ShardStream(kind, [url], 0, 1, 0, 1, False, bad, epochs=1)
keys = [key_of(s.source) for s in good_samples(kind, iter(stream), processor, bad)]
print("RESULT " + json.dumps({{"keys": keys, "bad": bad.as_dict()}}))
"""


def read_in_child(kind, url, headroom_mb=2048):
    return run_measured(READ_IN_CHILD.format(kind=kind, url=url, headroom=headroom_mb),
                        timeout=120)


def test_sparse_member_claiming_a_gibibyte_is_skipped_unread(tmp_path):
    path = write_members(str(tmp_path / "sparse.tar"), [
        ("t0.txt", b"the first document"), ("t1.txt", b"x" * 512),
        ("t2.txt", b"the third document"), ("t3.txt", b"the fourth document")])
    make_sparse(path, "t1.txt", 2**30)
    assert os.path.getsize(path) < 16 * 1024
    m = read_in_child("text", path)
    print(f"sparse member: {m['seconds']:.1f} s, peak {m['peak_mb']:.0f} MB, {m['result']}")
    assert m["rc"] == 0, m["err"]
    assert m["result"] == {"keys": ["t0", "t2", "t3"], "bad": {"sparse_member": 1}}
    assert m["peak_mb"] < MEMORY_BOUND_MB and m["seconds"] < 60


def test_oversized_and_special_members_are_judged_by_their_header(tmp_path):
    path = str(tmp_path / "odd.tar")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        def add(name, data=b"", **kw):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for k, v in kw.items():
                setattr(info, k, v)
            t.addfile(info, io.BytesIO(data))
        add("a.txt", b"first")
        add("somedir", type=tarfile.DIRTYPE)                       # harmless: skipped silently
        add("b.txt", type=tarfile.SYMTYPE, linkname="/etc/passwd")  # special_member
        add("c.txt", type=tarfile.FIFOTYPE)                         # special_member
        add("d.txt", b"y" * 5000)                                   # member_too_large (cap 2048)
        add("e.jpg", jpeg_bytes(1))
        add("e.txt", b"z" * 3000)                                   # drops all of sample e
        add("f.txt", b"last")
    cfg = make_cfg(text=[path], max_member_bytes=2048)
    keys, bad = delivered([path], limits=ReadLimits.from_config(cfg.data))
    assert keys == ["a", "f"]
    assert bad == {"member_too_large": 2, "special_member": 2}


def test_a_shard_command_that_fails_is_counted_and_the_next_shards_are_read(tmp_path):
    good = write_text_shards(str(tmp_path), [3, 3, 3])
    urls = [good[0], "pipe:exit 1", f"pipe:cat {good[1]}; exit 3",
            "pipe:no-such-command-here", good[2]]
    keys, bad = delivered(urls)
    assert sorted(keys) == sorted(f"t{k:03d}_{j:04d}" for k in range(3) for j in range(3))
    assert bad == {"unreadable_shard": 3}  # exit 1, exit 3 after its data, exit 127


def test_images_of_other_formats_behind_a_jpg_name_are_not_opened(tmp_path):
    bmp = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(bmp, format="BMP")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto showpage\n"
    samples = [pair("p0", 0), {"__key__": "p1", "jpg": bmp.getvalue(), "txt": "a bmp"},
               {"__key__": "p2", "jpg": eps, "txt": "an eps (Ghostscript)"}, pair("p3", 3)]
    path = write_tar(str(tmp_path / "formats.tar"), samples)
    keys, bad = delivered([path], "pair")
    assert sorted(keys) == ["p0", "p3"] and bad == {"bad_image": 2}


def test_memory_error_while_decoding_one_image_is_a_bad_sample(tmp_path):
    # 62 Mpx (under data.max_image_pixels) with transparency: decoding it needs ~600 MB, and
    # the child is allowed 300 MB more than it maps at the start: a real MemoryError.
    img = Image.new("P", (7900, 7900), 0)
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    del img
    samples = [pair("m0", 0), {"__key__": "m1", "png": buf.getvalue(), "txt": "too big to decode"},
               pair("m2", 2)]
    path = write_tar(str(tmp_path / "memory.tar"), samples)
    m = read_in_child("pair", path, headroom_mb=300)
    print(f"memory error: {m['seconds']:.1f} s, peak {m['peak_mb']:.0f} MB, {m['result']}")
    assert m["rc"] == 0, m["err"]
    assert m["result"]["keys"] == ["m0", "m2"]
    assert m["result"]["bad"] == {"bad_image": 1}


def test_a_whole_shard_of_bad_samples_does_not_stop_the_run(tmp_path):
    good = write_text_shards(str(tmp_path), [20, 20])
    bad_docs = [{"__key__": f"bad{j:05d}", "txt": b"\xff\xfe not utf-8"} for j in range(10_000)]
    poison = write_tar(str(tmp_path / "texts-poison.tar"), bad_docs)
    keys, bad = delivered([good[0], poison, good[1]])
    assert len(keys) == 40 and bad == {"bad_utf8": 10_000}


def test_a_data_set_of_only_bad_samples_stops_with_the_setting_named(tmp_path):
    cases = {  # bad at decoding / bad by the tar header (counted while reading the shard)
        "decode": [{"__key__": f"d{j:04d}", "txt": b"\xff"} for j in range(300)],
        "header": [{"__key__": f"h{j:04d}", "txt": b"w" * 3000} for j in range(300)],
    }
    for name, docs in cases.items():
        paths = [write_tar(str(tmp_path / f"{name}-{k}.tar"), docs) for k in range(3)]
        cfg = make_cfg(text=paths, bad_sample_window=200, max_bad_fraction=0.5,
                       max_member_bytes=2048)
        loader = build_train_loader(cfg, 0, 1, StandInProcessor(cfg))
        with pytest.raises(RuntimeError, match=r"more than data.max_bad_fraction=0.5 of "
                                               r"data.bad_sample_window=200") as e:
            next(iter(loader))
        print(name, json.dumps(str(e.value))[:300])


def test_new_faults_are_counted_once_over_any_resume(tmp_path):
    """Exact resume re-reads the saved window: faults met again there were counted before the
    save (BadDataCounter.muted), so the counts match an uninterrupted run batch for batch."""
    good = write_text_shards(str(tmp_path), [3, 2])
    sparse = write_members(str(tmp_path / "sparse.tar"), [
        ("s0.txt", b"before"), ("s1.txt", b"x" * 512), ("s2.txt", b"after")])
    make_sparse(sparse, "s1.txt", 2**30)
    odd = str(tmp_path / "odd.tar")
    with tarfile.open(odd, "w") as t:
        link = tarfile.TarInfo("o0.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
        for name in ("o1.txt", "o2.txt"):
            info = tarfile.TarInfo(name)
            info.size = 4
            t.addfile(info, io.BytesIO(b"text"))
    urls = [good[0], sparse, f"pipe:cat {good[1]}; exit 3", odd, "pipe:exit 1"]
    cfg = make_cfg(text=urls, num_workers=0, micro_batch_size=1, shuffle_buffer=2)
    whole = build_train_loader(cfg, 0, 1, StandInProcessor(cfg))
    it = iter(whole)
    want = []
    for _ in range(20):  # two epochs of 9 samples, and a bit
        next(it)
        want.append(whole.bad_sample_counts())
    assert want[8] == {"sparse_member": 1, "special_member": 1, "unreadable_shard": 2}
    for k in range(1, 18):
        assert bad_counts_after_resume(cfg, k) == want[k + 1], k
