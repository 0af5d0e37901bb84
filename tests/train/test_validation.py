"""Periodic validation (train/validation.py): the held-out set and its masks are fixed, the
numbers of a resumed run equal the straight run's, and validating leaves training untouched."""
import types

import pytest
import torch
import webdataset as wds
from PIL import Image

from megatron_style.config import load_config
from megatron_style.data.build_tokenizers import build_text_tokenizer
from megatron_style.train.validation import Validator, build_held_out, validated_streams
from tests.train.launch import TINY, explain, metrics, pretrain, run_dirs

# 10 held-out samples a stream in micro-batches of 6: one full and one partial batch each.
COMMON = [*TINY, "data.source=demo", "data.num_workers=1", "data.masking.image_min_block=2",
          "steps=4", "model.drop_path=0.1", "checkpoint.every_steps=100", "eval.samples=10"]
TRAIN_KEYS = ("loss", "loss/image", "loss/text", "loss/pair_text", "loss/itc", "grad_norm")


def val_rows(tmp_path, name):
    return {r["step"]: r for r in metrics(tmp_path, name) if any(k.startswith("val/") for k in r)}


def train_rows(tmp_path, name):
    return [{k: r.get(k) for k in TRAIN_KEYS} | {"step": r["step"]}
            for r in metrics(tmp_path, name) if "loss" in r]


def tiny(*overrides):
    return load_config(None, ["model.preset=tiny", "model.kernels=reference", *overrides])


# ---- the held-out set ----------------------------------------------------------------------
def _same(a, b):
    assert [s.source for s in a] == [s.source for s in b]
    for x, y in zip(a, b):
        for f in ("image", "image_mask", "text", "text_mask", "text_targets"):
            u, v = getattr(x, f), getattr(y, f)
            assert (u is None) == (v is None), f
            if u is not None:
                assert torch.equal(u, v), (f, x.source)


def test_demo_held_out_set_is_fixed_and_outside_training():
    cfg = tiny("eval.samples=6")
    tok = build_text_tokenizer(cfg)
    first, skipped = build_held_out(cfg, tok)
    torch.manual_seed(123)  # the global generators play no part
    again, _ = build_held_out(cfg, tok)
    assert set(first) == {"image", "text", "pair"} and skipped == {"image": {}, "text": {}, "pair": {}}
    for stream in first:
        assert len(first[stream]) == 6
        _same(first[stream], again[stream])
        # held-out indices: the demo's evaluation range, which training never reads
        assert all(int(s.source.rsplit("/", 1)[1]) >= 1 << 40 for s in first[stream])
    assert all(s.image_mask.any() for s in first["image"])
    assert all(s.text_mask.any() for s in first["text"] + first["pair"])
    # a sample's masks depend on (eval.seed, stream, index) alone: a smaller set is a prefix
    small, _ = build_held_out(tiny("eval.samples=3"), tok)
    for stream in first:
        _same(small[stream], first[stream][:3])
    # another eval.seed draws other masks of the same samples
    other, _ = build_held_out(tiny("eval.samples=6", "eval.seed=7"), tok)
    assert [s.source for s in other["image"]] == [s.source for s in first["image"]]
    assert any(not torch.equal(a.image_mask, b.image_mask) for a, b in zip(other["image"], first["image"]))


def test_streams_validated():
    assert validated_streams(tiny()) == ("image", "text", "pair")
    assert validated_streams(tiny("data.text.weight=0")) == ("image", "pair")
    assert validated_streams(tiny("data.source=synthetic")) == ()


def _png(i, size=32):
    import io
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (40 * i % 256, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_shard_held_out_set_skips_bad_samples(tmp_path):
    shard = str(tmp_path / "eval-00000.tar")
    with wds.TarWriter(shard) as w:
        w.write({"__key__": "a", "png": _png(1), "txt": "a red square"})
        w.write({"__key__": "b", "png": b"not an image", "txt": "broken image"})
        w.write({"__key__": "c", "png": _png(2)})                      # no caption
        w.write({"__key__": "d", "png": _png(3), "txt": "a blue circle"})
        w.write({"__key__": "e", "png": _png(4), "txt": "a green star"})
    train = ["data.source=shards", f"data.image.shards={shard}", f"data.pair.shards={shard}",
             "data.text.weight=0", "eval.samples=2"]
    cfg = tiny(*train, f"eval.pair_shards={shard}")
    tok = build_text_tokenizer(tiny())  # the demo's SentencePiece model: any one will do here
    held, skipped = build_held_out(cfg, tok)
    # the image stream has no eval shards: not validated; the text stream is not trained
    assert validated_streams(cfg) == ("pair",) and set(held) == {"pair"}
    assert [s.source.rsplit("/", 1)[1] for s in held["pair"]] == ["a", "d"]  # first 2 good ones
    assert skipped["pair"] == {"bad_image": 1, "missing_text": 1}
    again, _ = build_held_out(cfg, tok)
    _same(held["pair"], again["pair"])
    # no augmentation: the whole image, resized, whatever data.crop_scale says
    cropped, _ = build_held_out(tiny(*train, f"eval.pair_shards={shard}", "data.crop_scale=[0.1,0.2]"), tok)
    _same(held["pair"], cropped["pair"])
    # a pattern that matches nothing leaves the stream out with a warning, never fails the run
    said = []
    none, _ = build_held_out(tiny(*train, f"eval.pair_shards={tmp_path}/missing-{{0..3}}.tar"), tok,
                             said.append)
    assert none == {} and "pair stream is not validated" in said[0]


# ---- in training runs ----------------------------------------------------------------------
class OneProcess:
    """What Validator needs of a Trainer, for a checkpoint's weights in this process."""

    def __init__(self, ckpt):
        from megatron_style.cli.evaluate import load_retrieval_model
        from megatron_style.data.build_tokenizers import build_visual_tokenizer
        model, self.cfg = load_retrieval_model(ckpt)
        self.device, self.rank, self.metrics = torch.device("cpu"), 0, None
        self.text_tokenizer = build_text_tokenizer(self.cfg)
        self.visual = build_visual_tokenizer(self.cfg).eval()
        self.engine = lambda b: model(b)
        self.engine.module = model
        self.watchdog = types.SimpleNamespace(beat=lambda *a: None)

    def prepare(self, b):
        return b.with_image_targets(self.visual(b.images, b.tokenizer_images)) \
            if b.image_targets_pending else b

    def _log(self, msg):
        print(msg)


@pytest.mark.multiproc
def test_validation_resumes_exactly_and_leaves_training_alone(tmp_path):
    """2 ranks, ZeRO-3 (every rank must run the same forwards), MDM + ITC: validation at
    steps 2 and 4 of a straight run equals a run stopped at step 2 and resumed; the training
    losses are bit-identical with validation off."""
    zero3 = [*COMMON, "parallel.zero_stage=3", "objective.itc=1"]
    on = pretrain([*zero3, *run_dirs(tmp_path, "on"), "eval.every_steps=2"], ranks=2)
    assert on.returncode == 0, explain(on)
    assert "validation at step 4" in on.stdout
    off = pretrain([*zero3, *run_dirs(tmp_path, "off")], ranks=2)
    assert off.returncode == 0, explain(off)
    assert "validation at step" not in off.stdout
    a, b = train_rows(tmp_path, "on"), train_rows(tmp_path, "off")
    assert len(a) == 4 and a == b  # exactly: not approximately
    assert len({r["loss"] for r in a}) > 1

    stopped = pretrain([*zero3, *run_dirs(tmp_path, "resumed"), "eval.every_steps=2",
                        "stop_at_step=2"], ranks=2)
    assert stopped.returncode == 0, explain(stopped)
    resumed = pretrain([*zero3, *run_dirs(tmp_path, "resumed"), "eval.every_steps=2"], ranks=2)
    assert resumed.returncode == 0, explain(resumed)
    assert "at step 2" in resumed.stdout
    straight, again = val_rows(tmp_path, "on"), val_rows(tmp_path, "resumed")
    assert sorted(straight) == sorted(again) == [2, 4]
    assert straight == again
    keys = {"val/loss/image", "val/acc/image", "val/loss/text", "val/acc/text",
            "val/loss/pair_text", "val/acc/pair_text"}  # pair images are not masked by default
    keys |= {f"val/retrieval/{k}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5",
                                             "t2i_r10", "mean_recall", "candidates")}
    assert set(straight[4]) == keys | {"step"}
    assert straight[4]["val/retrieval/candidates"] == 10
    assert straight[2] != straight[4]  # the weights moved between the two
    assert train_rows(tmp_path, "resumed") == a
    # what ZeRO-3's 2 ranks computed is what the saved step-4 weights give in one process
    # (the retrieval forwards call the encoder outside the root module's forward)
    offline = Validator(OneProcess(str(tmp_path / "on" / "ckpt"))).run(4)
    assert offline == pytest.approx({k: v for k, v in straight[4].items() if k != "step"},
                                    rel=1e-5, abs=1e-6)
    # TensorBoard has them too
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(tmp_path / "on" / "tb"))
    ev.Reload()
    assert [e.step for e in ev.Scalars("val/loss/text")] == [2, 4]


@pytest.mark.multiproc
def test_retrieval_with_itc_heads(tmp_path):
    p = pretrain([*COMMON, *run_dirs(tmp_path), "steps=2", "eval.every_steps=2",
                  "objective.itc=1"], ranks=1)
    assert p.returncode == 0, explain(p)
    row = val_rows(tmp_path, "run")[2]
    for way in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert 0 <= row[f"val/retrieval/{way}_r{k}"] <= 100
        assert row[f"val/retrieval/{way}_r10"] == 100  # 10 candidates
    assert row["val/retrieval/candidates"] == 10  # the held-out pairs
    assert "retrieval over 10 pairs" in p.stdout
