"""Small inputs must not cost gigabytes: a 20 KB PNG claiming 13000^2 pixels is skipped from its
header (it decodes to 2.9 GB), and a 64 MiB caption costs a tokenization of its first few
kilobytes (whole, it took 3.5 GB and 20 s), with the same ids as tokenizing it whole."""
import io
import random
import warnings

import pytest
from PIL import Image

from megatron_style.data.bad_data import BadDataCounter
from megatron_style.data.loader import good_samples
from megatron_style.data.streams import ShardStream
from megatron_style.data.build_tokenizers import build_text_tokenizer
from tests.data.streaming_helpers import (StandInProcessor, key_of, make_cfg, pair,
                                                    run_measured, write_tar)

pytestmark = pytest.mark.faults

MEMORY_BOUND_MB = 600  # the child imports torch (~230 MB)


def palette_png(side: int) -> bytes:
    img = Image.new("P", (side, side), 0)
    img.putpalette([0, 0, 0, 255, 255, 255])
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True, transparency=0)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb_shard(tmp_path_factory):
    png = palette_png(13000)
    assert len(png) < 64 * 1024
    samples = [pair("b0", 0), {"__key__": "b1", "png": png, "txt": "a bomb"}, pair("b2", 2)]
    return write_tar(str(tmp_path_factory.mktemp("bomb") / "bomb.tar"), samples)


DECODE_IN_CHILD = """
import json
from tests.data.streaming_helpers import cap_address_space, key_of, make_cfg
from megatron_style.data.bad_data import BadDataCounter
from megatron_style.data.errors import BadSample
from megatron_style.data.processor import SampleProcessor
from megatron_style.data.streams import ShardStream
from megatron_style.data.build_tokenizers import build_text_tokenizer
import numpy as np
cfg = make_cfg(image=[{url!r}])
processor = SampleProcessor(cfg, build_text_tokenizer(make_cfg("demo")))
cap_address_space(3072)  # before the fix this child needs 2.9 GB more; keep the machine safe
bad = BadDataCounter()
keys = []
for raw, key in ShardStream("image", [{url!r}], 0, 1, 0, 1, False, bad, epochs=1):
    try:
        if isinstance(raw, BadSample):
            raise raw
        processor.image_views(raw.image, np.random.default_rng(key), "image", raw.source)
        keys.append(key_of(raw.source))
    except BadSample as e:
        bad.add(e.reason, str(e))
print("RESULT " + json.dumps({{"keys": keys, "bad": bad.as_dict()}}))
"""


def test_png_bomb_is_skipped_from_its_header_in_bounded_memory(bomb_shard):
    m = run_measured(DECODE_IN_CHILD.format(url=bomb_shard), timeout=120)
    print(f"PNG bomb: {m['seconds']:.1f} s, peak {m['peak_mb']:.0f} MB, {m['result']}")
    assert m["rc"] == 0, m["err"]
    assert m["result"] == {"keys": ["b0", "b2"], "bad": {"image_too_large": 1}}
    assert m["peak_mb"] < MEMORY_BOUND_MB and m["seconds"] < 60


def test_pillows_bomb_warning_is_a_counted_sample_even_under_warnings_as_errors(tmp_path):
    # 9500^2 is above Pillow's own limit: it warns in Image.open, which -W error (or a test
    # suite's filterwarnings) turns into an exception raised out of the reader.
    samples = [pair("w0", 0), {"__key__": "w1", "png": palette_png(9500), "txt": "big"},
               pair("w2", 2)]
    path = write_tar(str(tmp_path / "warn.tar"), samples)
    cfg = make_cfg(pair=[path])
    bad = BadDataCounter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stream = ShardStream("pair", [path], 0, 1, 0, 1, False, bad, epochs=1)
        keys = [key_of(s.source)
                for s in good_samples("pair", iter(stream), StandInProcessor(cfg), bad)]
    assert keys == ["w0", "w2"] and bad.as_dict() == {"image_too_large": 1}


TOKENIZE_IN_CHILD = """
import json, resource, time
from megatron_style.config import PretrainConfig, from_dict
from megatron_style.data.build_tokenizers import build_text_tokenizer
tok = build_text_tokenizer(from_dict(PretrainConfig, {"model": {"preset": "tiny"}}))
caption = "a small red circle left of a blue square. " * (64 * 2**20 // 42)
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, resource.RLIM_INFINITY))  # not the machine's
peak0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
ids = tok.encode_for_model(caption, 64)
print("RESULT " + json.dumps({"n": len(ids), "seconds": time.monotonic() - t0,
                              "grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                          - peak0) / 1024,
                              "same": ids == tok.encode_for_model(caption[:4000], 64)}))
"""


def test_a_64_mib_caption_is_cut_before_tokenizing():
    m = run_measured(TOKENIZE_IN_CHILD, timeout=120)
    r = m["result"] or {}
    print(f"64 MiB caption: tokenized in {r.get('seconds', -1):.2f} s, peak grew by "
          f"{r.get('grew_mb', -1):.0f} MB; child peak {m['peak_mb']:.0f} MB (caption 64 MB)")
    assert m["rc"] == 0, m["err"]
    assert r["n"] == 64 and r["same"]
    assert r["seconds"] < 5 and r["grew_mb"] < 50 and m["peak_mb"] < MEMORY_BOUND_MB


def test_cutting_gives_the_ids_of_tokenizing_the_whole_text():
    tok = build_text_tokenizer(make_cfg("demo"))
    rng = random.Random(0)
    words = ["a", "small", "red", "circle", "left", "of", "the", "blue", "square", "xyzzy",
             "Ünïcödé", "日本語のテキスト", "🙂", "big-triangle,above"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4000))) for _ in range(40)]
    texts += ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
                        for _ in range(rng.randint(1, 200))) for _ in range(20)]
    texts += ["".join(rng.choice("日本語のテキスト漢字かなカナ") for _ in range(rng.randint(1, 6000)))
              for _ in range(20)]  # no spaces at all: the cut falls inside a "word"
    texts += ["x" * 10_000, " " * 5000 + "late start", "word " * 3000]
    for text in texts:
        pieces = tok.encode(text)
        for max_len in (3, 5, 16, 64):
            assert tok.encode_for_model(text, max_len) == \
                [tok.bos_id, *pieces[:max_len - 2], tok.eos_id], (text[:40], max_len)
