import io

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_style.config import ConfigError
from megatron_style.data.demo import DemoSource
from megatron_style.data.errors import BadSample
from megatron_style.data.processor import SampleProcessor
from megatron_style.data.raw import RawSample
from megatron_style.data.build_tokenizers import build_text_tokenizer
from megatron_style.data.build_tokenizers import build_visual_tokenizer
from megatron_style.batch import KIND_IMAGE, KIND_PAIR, KIND_TEXT, pack_samples, validate_packed
from megatron_style.model.pretraining import MaskedDataModel


def demo_batch(cfg, proc, n=3, seed=0):
    src = DemoSource.from_config(cfg)
    rng = np.random.default_rng(seed)
    return [proc(src.sample(k, i), rng) for i in range(n) for k in ("image", "text", "pair")]


def forward(cfg, samples, visual):
    b = pack_samples(samples, cfg.model)
    assert b.image_targets_pending
    b = b.with_image_targets(visual(b.images, b.tokenizer_images))
    validate_packed(b, cfg.model)
    torch.manual_seed(0)
    out = MaskedDataModel(cfg.model)(b)
    assert torch.isfinite(out.loss)
    return b, out


def test_demo_end_to_end_kmeans(tiny_pretrain):
    cfg = tiny_pretrain()
    tok = build_text_tokenizer(cfg)
    proc = SampleProcessor(cfg, tok)
    samples = demo_batch(cfg, proc)
    assert [s.kind for s in samples[:3]] == [KIND_IMAGE, KIND_TEXT, KIND_PAIR]
    for s in samples:
        assert s.image_targets is None and s.tokenizer_image is None
        if s.image is not None:  # pair images are seen whole (data.masking.pair_image_ratio 0)
            hidden = 0 if s.kind == KIND_PAIR else 6
            assert s.image.shape == (3, 32, 32) and int(s.image_mask.sum()) == hidden
        if s.text is not None:
            assert s.text[0] == tok.bos_id and s.text[-1] == tok.eos_id and s.text_mask.any()
            # BERT's mode: a hidden token is <mask>, a random one or itself; the rest unchanged
            assert torch.equal(s.text[~s.text_mask], s.text_targets[~s.text_mask])
    b, out = forward(cfg, samples, build_visual_tokenizer(cfg))
    metrics = out.stream_metrics()
    assert {"loss/image", "loss/text", "loss/pair_text"} <= set(metrics)
    assert "loss/pair_image" not in metrics
    assert b.image_targets.shape == (3 * 6,) and int(b.image_targets.max()) < 256

    cfg = tiny_pretrain("data.masking.text_mode=mask", "data.masking.pair_image_ratio=0.4")
    for s in demo_batch(cfg, SampleProcessor(cfg, tok)):
        if s.image is not None:
            assert int(s.image_mask.sum()) == 6
        if s.text is not None:
            assert torch.equal(s.text[s.text_mask], torch.full_like(s.text[s.text_mask], tok.mask_id))


def test_end_to_end_pixels_and_vqkd(tiny_pretrain, tmp_path):
    cfg = tiny_pretrain("model.visual_target=pixels", "data.tokenizer.visual=pixels")
    proc = SampleProcessor(cfg, build_text_tokenizer(cfg))
    b, _ = forward(cfg, demo_batch(cfg, proc, n=2), build_visual_tokenizer(cfg))
    # 2 images x 6 hidden patches; the 2 pairs' images are not masked
    assert b.image_targets.shape == (2 * 6, 192) and b.image_targets.dtype == torch.float32

    from test_visual_tokenizers import CODES, vqkd_state
    torch.save({"model": vqkd_state(grid=2)}, tmp_path / "vqkd.pth")
    cfg = tiny_pretrain("data.tokenizer.visual=vqkd", f"data.tokenizer.visual_model={tmp_path}/vqkd.pth",
                        f"model.visual_vocab_size={CODES}")
    proc = SampleProcessor(cfg, build_text_tokenizer(cfg))
    samples = demo_batch(cfg, proc, n=2)
    assert all(s.tokenizer_image.shape == (3, 64, 64) for s in samples if s.image is not None)
    b, _ = forward(cfg, samples, build_visual_tokenizer(cfg))
    assert b.tokenizer_images.shape == (4, 3, 64, 64)


def test_deterministic_given_rng_and_text_ratios(tiny_pretrain):
    cfg = tiny_pretrain("model.max_text_len=200")
    proc = SampleProcessor(cfg, build_text_tokenizer(cfg))
    raw = DemoSource.from_config(cfg).sample("pair", 7)
    a, b = proc(raw, np.random.default_rng(1)), proc(raw, np.random.default_rng(1))
    for f in ("image", "image_mask", "text", "text_mask", "text_targets"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    long = " ".join(DemoSource(32).sentences(12))
    for kind, ratio in (("text", 0.15), ("pair", 0.5)):
        img = raw.image if kind == "pair" else None
        s = proc(RawSample(kind, img, long, "x"), np.random.default_rng(0))
        n = len(s.text) - 2
        assert abs(int(s.text_mask.sum()) - ratio * n) < 1


def test_truncation_to_max_text_len(tiny_pretrain):
    cfg = tiny_pretrain()
    proc = SampleProcessor(cfg, build_text_tokenizer(cfg))
    s = proc(RawSample("text", None, " ".join(DemoSource(32).sentences(40)), "x"), np.random.default_rng(0))
    assert len(s.text) == cfg.model.max_text_len == 64


def test_bad_samples_raise_bad_sample(tiny_pretrain):
    cfg = tiny_pretrain()
    proc = SampleProcessor(cfg, build_text_tokenizer(cfg))
    img = DemoSource(32).sample("image", 0).image
    buf = io.BytesIO()
    img.resize((200, 200)).save(buf, "JPEG")
    broken = Image.open(io.BytesIO(buf.getvalue()[:len(buf.getvalue()) // 2]))
    cases = [(RawSample("text", None, "   ", "a"), "empty_text"),
             (RawSample("pair", img, b"\xc3\x28 bad", "b"), "bad_utf8"),
             (RawSample("image", Image.new("RGB", (3, 3)), None, "c"), "image_too_small"),
             (RawSample("image", broken, None, "d"), "bad_image")]
    for raw, reason in cases:
        with pytest.raises(BadSample) as e:
            proc(raw, np.random.default_rng(0))
        assert e.value.reason == reason and e.value.source == raw.source


def test_vocab_larger_than_model_is_a_config_error(tiny_pretrain):
    cfg = tiny_pretrain()
    tok = build_text_tokenizer(cfg)
    cfg.model.text_vocab_size = tok.vocab_size - 1
    with pytest.raises(ConfigError, match="model.text_vocab_size"):
        SampleProcessor(cfg, tok)
