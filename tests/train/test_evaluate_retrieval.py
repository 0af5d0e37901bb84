"""`beit3-evaluate retrieval` end to end: the checkpoint of a tiny demo run trained with
objective.itc, the files beit3-export writes from it, held-out pair shards, and the error for a
model without ITC heads."""
import io
import json

import pytest
import torch
import webdataset as wds

from megatron_style.cli.evaluate import load_retrieval_model, main
from megatron_style.config import dump_yaml
from tests.train.launch import TINY, explain, pretrain, run_dirs

pytestmark = pytest.mark.multiproc

RECALL_KEYS = {f"{w}_r{k}" for w in ("i2t", "t2i") for k in (1, 5, 10)} | {"mean_recall", "candidates"}


@pytest.fixture(scope="module")
def itc_run(tmp_path_factory):
    """A 2-step 1-process demo run with ITC heads; decoupled attention so that the released
    and retrieval layouts can be exported from it."""
    tmp = tmp_path_factory.mktemp("itc_run")
    p = pretrain([*TINY, *run_dirs(tmp), "data.source=demo", "data.num_workers=0",
                  "data.masking.image_min_block=2", "steps=2", "objective.itc=1",
                  "model.attention=decoupled", "model.vl_layers=0"])
    assert p.returncode == 0, explain(p)
    return tmp, str(tmp / "run" / "ckpt")


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_retrieval_of_a_checkpoint(itc_run, capsys, tmp_path):
    _, ckpt = itc_run
    out_json = tmp_path / "r" / "retrieval.json"
    code, out, err = _run(capsys, "retrieval", ckpt, "--samples", "12", "--batch-size", "5",
                          "--json", str(out_json))
    assert code == 0, err
    assert "zero-shot retrieval over 12 held-out pairs" in out
    assert "image->text R@1/5/10" in out and "text->image R@1/5/10" in out
    r = json.loads(out_json.read_text())
    assert RECALL_KEYS <= set(r) and r["candidates"] == 12 and r["checkpoint"] == ckpt
    assert all(0 <= r[k] <= 100 for k in RECALL_KEYS - {"candidates"})
    # the same pairs and numbers as the library's demo_retrieval (its batch size, 64)
    from megatron_style.train.evaluate import demo_retrieval
    from megatron_style.data.build_tokenizers import build_text_tokenizer
    model, cfg = load_retrieval_model(ckpt)
    lib = demo_retrieval(model.eval(), cfg, build_text_tokenizer(cfg), lambda b: b, 12)
    assert lib == pytest.approx({k: r[k] for k in lib}, abs=1e-9)
    # the caption evaluation's usage still works (and loads the run's ITC heads)
    code, out, err = _run(capsys, ckpt, "--samples", "8")
    assert code == 0, err
    assert "masked caption-word accuracy on 8 held-out pairs" in out


def test_retrieval_of_exported_files(itc_run, capsys, tmp_path):
    from megatron_style.checkpoint.directory import resolve
    from megatron_style.checkpoint.fp32 import checkpoint_pretrain_config
    from megatron_style.train.export import export
    import os
    _, ckpt = itc_run
    base = ["--samples", "10", "--json"]
    assert _run(capsys, "retrieval", ckpt, *base, str(tmp_path / "ckpt.json"))[0] == 0
    want = json.loads((tmp_path / "ckpt.json").read_text())
    ours = export(ckpt, str(tmp_path / "ours.pt"), "ours")  # records its config
    assert _run(capsys, "retrieval", ours, *base, str(tmp_path / "ours.json"))[0] == 0
    released = export(ckpt, str(tmp_path / "itc.pth"), "retrieval")  # unilm's layout, no config
    code, _, err = _run(capsys, "retrieval", released)
    assert code == 2 and "records no config: give --config" in err
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(dump_yaml(checkpoint_pretrain_config(os.path.join(*resolve(ckpt)))))
    code, _, err = _run(capsys, "retrieval", released, "--config", str(recipe), *base,
                        str(tmp_path / "released.json"))
    assert code == 0, err
    for name in ("ours", "released"):
        got = json.loads((tmp_path / f"{name}.json").read_text())
        assert {k: got[k] for k in RECALL_KEYS} == pytest.approx({k: want[k] for k in RECALL_KEYS},
                                                                 abs=1e-9), name


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_retrieval_on_pair_shards(itc_run, capsys, tmp_path):
    from megatron_style.data.demo import DemoSource
    _, ckpt = itc_run
    src = DemoSource(32, seed=5)
    shard = str(tmp_path / "pairs-00000.tar")
    with wds.TarWriter(shard) as w:
        w.write({"__key__": "bad", "png": b"not an image", "txt": "a broken pair"})
        for i in range(6):
            s = src.eval_sample(i)
            w.write({"__key__": f"{i:04d}", "png": _png(s.image), "txt": s.text})
    code, out, err = _run(capsys, "retrieval", ckpt, "--pair-shards", shard, "--samples", "4",
                          "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "over 4 held-out pairs" in out and "bad_image" in err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["candidates"] == 4 and r["pairs"] == shard
    code, _, err = _run(capsys, "retrieval", ckpt, "--pair-shards", str(tmp_path / "none-{0..2}.tar"))
    assert code == 2 and "--pair-shards" in err and "matches no shard" in err


def test_no_itc_heads_is_a_clear_error(itc_run, capsys, tmp_path):
    from megatron_style.checkpoint.directory import resolve
    from megatron_style.checkpoint.fp32 import checkpoint_pretrain_config
    from megatron_style.model.pretraining import MaskedDataModel
    import dataclasses
    import os
    _, ckpt = itc_run
    cfg = checkpoint_pretrain_config(os.path.join(*resolve(ckpt)))
    cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, itc=0.0))
    path = str(tmp_path / "mdm_only.pt")  # our export's layout: weights and the recipe
    torch.save({"model": MaskedDataModel(cfg.model).state_dict(), "config": dump_yaml(cfg)}, path)
    code, out, err = _run(capsys, "retrieval", path)
    assert code == 2 and out == ""
    assert "has no ITC heads" in err and "objective.itc=1" in err
    code, _, err = _run(capsys, "retrieval", str(tmp_path / "nothing_here"))
    assert code == 2 and "no such checkpoint" in err
