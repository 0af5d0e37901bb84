import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from megatron_style.data.demo import EVAL_START, DemoSource, caption_eval_samples
from megatron_style.data.demo.cache import build_once
from megatron_style.data.demo.evaluation import caption_tokens
from megatron_style.data.demo.scenes import COLORS, RELATIONS, SHAPES, SIZES, shape_side


def test_same_index_same_sample_and_resumable():
    a, b = DemoSource(32, seed=3), DemoSource(32, seed=3)
    for kind in ("image", "text", "pair"):
        x, y = a.sample(kind, 12345), b.sample(kind, 12345)
        assert x.text == y.text and x.source == y.source == f"demo/{kind}/12345"
        if kind != "text":
            assert x.image.tobytes() == y.image.tobytes() and x.image.size == (32, 32)
    assert a.sample("pair", 1).text != a.sample("pair", 2).text or \
        a.sample("pair", 1).image.tobytes() != a.sample("pair", 2).image.tobytes()
    assert DemoSource(32, seed=4).sample("pair", 1).image.tobytes() != a.sample("pair", 1).image.tobytes()
    # a stream split by (start, step) and resumed at an index yields the same samples
    idx = [i for i, _ in zip(range(5, 100, 3), range(4))]
    streamed = [(i, s.text) for (i, s), _ in zip(a.stream("text", start=5, step=3), range(4))]
    assert streamed == [(i, a.sample("text", i).text) for i in idx]


def test_eval_range_is_disjoint():
    src = DemoSource(32)
    assert src.eval_sample(0).source == f"demo/pair/{EVAL_START}"
    train_images = {src.sample("pair", i).image.tobytes() for i in range(300)}
    assert not any(src.eval_sample(i).image.tobytes() in train_images for i in range(300))
    with pytest.raises(ValueError, match="held-out index"):
        src.eval_sample(-1)


@pytest.mark.parametrize("size", [32, 64, 224])
def test_captions_describe_the_drawn_image(size):
    src = DemoSource(size)
    n_two = 0
    for i in range(150):
        scene = src.scene("pair", i)
        img = np.asarray(src.sample("pair", i).image).astype(int)
        words = scene.caption.split()
        for sh in scene.shapes:
            assert sh.color in words and sh.shape in words and sh.size in words
            l, t, r, b = sh.box
            assert r - l == shape_side(size, sh.size) and 0 <= l and r <= size and b <= size
            cx, cy = (l + r) // 2, (t + b) // 2
            assert np.abs(img[cy, cx] - COLORS[sh.color]).max() <= 2, (i, scene.caption)
            corner = img[t, l]   # square fills its corners; the others leave them background
            is_bg = np.abs(corner - scene.background).max() <= 40
            if len(scene.shapes) == 1 or not _inside(l, t, scene.shapes):
                assert is_bg == (sh.shape != "square"), (i, sh, corner)
        if len(scene.shapes) == 2:
            n_two += 1
            a, b = scene.shapes
            axis, first_before = RELATIONS[scene.relation]
            lo, hi = (a, b) if first_before else (b, a)
            assert lo.box[axis + 2] < hi.box[axis], (i, scene.caption)   # boxes disjoint in order
            assert scene.relation in scene.caption
    assert 50 < n_two < 125


def _inside(x, y, shapes):
    return sum(s.box[0] <= x < s.box[2] and s.box[1] <= y < s.box[3] for s in shapes) > 1


def test_text_stream_uses_the_caption_vocabulary():
    known = set(COLORS) | set(SHAPES) | set(SIZES) | {w for r in RELATIONS for w in r.split()} | \
        {"a", "there", "is", "and"}
    texts = DemoSource(32).sentences(300)
    assert all(set(t.split()) <= known for t in texts)
    assert len(set(texts)) > 120   # 48 single-shape sentences, ~9000 two-shape ones


def test_demo_tokenizer_word_by_word_equals_whole_caption(demo_text_tok):
    src = DemoSource(32)
    for i in range(50):
        scene = src.scene("pair", i)
        ids, roles = caption_tokens(demo_text_tok, scene, 64)
        assert ids == demo_text_tok.encode_for_model(scene.caption, 64)
        assert len(ids) == len(roles)
    assert demo_text_tok.vocab_size <= 1000
    # content words are single pieces in the demo vocabulary
    for w in list(COLORS) + list(SHAPES) + list(SIZES):
        assert len(demo_text_tok.encode(w)) == 1


def test_caption_eval_samples(tiny_pretrain, demo_text_tok):
    cfg = tiny_pretrain()
    true, swapped = caption_eval_samples(cfg, demo_text_tok, 24, seed=5)
    assert len(true) == len(swapped) == 24
    src = DemoSource(32, 5)
    content = {w for w in list(COLORS) + list(SHAPES) + list(SIZES) + ["left", "right", "above", "below"]}
    for i, (t, s) in enumerate(zip(true, swapped)):
        assert torch.equal(t.text, s.text) and torch.equal(t.text_mask, s.text_mask)
        assert torch.equal(t.text_targets, s.text_targets)
        assert not t.image_mask.any() and t.image.shape == (3, 32, 32)
        hidden = [demo_text_tok.decode([x]) for x in t.text_targets[t.text_mask].tolist()]
        shown = [demo_text_tok.decode([x]) for x in t.text_targets[~t.text_mask].tolist()]
        assert set(hidden) <= content and not (set(shown) & content)
        assert (t.text[t.text_mask] == demo_text_tok.mask_id).all()
        assert not torch.equal(t.image, s.image)
        j = int(s.source.split("image")[1])
        mine, theirs = src.eval_scene(i).content(), src.eval_scene(j).content()
        assert mine != theirs
    again, _ = caption_eval_samples(cfg, demo_text_tok, 24, seed=5)
    assert all(torch.equal(a.image, b.image) for a, b in zip(true, again))


def _builder(path, log):
    def build(tmp):
        with open(log, "a") as f:
            f.write("built\n")
        import time
        time.sleep(0.3)
        with open(tmp, "w") as f:
            f.write("payload")
    build_once(path, build)


def test_cache_is_built_once_when_two_ranks_start_together(tmp_path):
    path, log = str(tmp_path / "thing.bin"), str(tmp_path / "log")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_builder, args=(path, log)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(20)
        assert p.exitcode == 0
    assert open(path).read() == "payload" and open(log).read() == "built\n"
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
