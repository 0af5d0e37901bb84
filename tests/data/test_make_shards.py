"""make-shards round trips (images, pairs from CSV and JSONL, texts) and its errors."""
import json
import os
import subprocess
import sys

import pytest

from megatron_style.data.bad_data import BadDataCounter
from megatron_style.cli.make_shards import main
from megatron_style.data.make_shards import parse_size
from megatron_style.data.shards import resolve_shards
from megatron_style.data.streams import ShardStream
from megatron_style.data.tar_samples import read_shard
from streaming_helpers import jpeg_bytes, png_bytes


def read_all(folder, kind):
    """Every sample of the shards in `folder` as the loader's readers see them."""
    urls = resolve_shards(folder)
    stream = ShardStream(kind, urls, 0, 1, 0, 1, False, BadDataCounter(), epochs=1)
    return urls, [raw for raw, _ in stream]


def members(urls):
    return [s for u in urls for s in read_shard(u, BadDataCounter())]


def test_images_from_a_folder(tmp_path):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    blobs = {"a.jpg": jpeg_bytes(1), "b.jpeg": jpeg_bytes(2), "sub/c.png": png_bytes(3)}
    for name, data in blobs.items():
        (src / name).write_bytes(data)
    (src / "notes.md").write_text("not an image")
    out = tmp_path / "out"
    assert main(["image", str(src), "-o", str(out), "--max-samples", "2"]) == 0
    urls, raws = read_all(str(out), "image")
    assert [os.path.basename(u) for u in urls] == ["image-000000.tar", "image-000001.tar"]
    assert len(raws) == 3 and all(r.kind == "image" and r.image.size[0] > 0 for r in raws)
    got = members(urls)
    assert [s["__key__"] for s in got] == ["000000000", "000000001", "000000002"]
    assert [s.get("jpg", s.get("png")) for s in got] == list(blobs.values())  # bytes copied


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_pairs_from_a_table(tmp_path, fmt):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(5):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
        rows.append({"path": f"img/{i}.jpg", "text": f"caption {i}", "license": "cc-by"})
    rows.append({"path": "img/missing.jpg", "text": "no file", "license": ""})
    rows.append({"path": "img/0.jpg", "text": "   ", "license": ""})
    table = tmp_path / f"pairs.{fmt}"
    if fmt == "csv":
        table.write_text("path,text,license\n" + "".join(
            f"{r['path']},{r['text']},{r['license']}\n" for r in rows))
    else:
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["pair", str(table), "-o", str(out), "--image-column", "path",
                 "--caption-column", "text", "--max-bytes", "2KB"]) == 0
    urls, raws = read_all(str(out), "pair")
    assert len(urls) > 1  # split by size
    assert [r.text for r in raws] == [f"caption {i}" for i in range(5)]
    meta = json.loads(members(urls)[2]["json"])
    assert meta["image"] == "img/2.jpg" and meta["license"] == "cc-by"


def test_texts_one_document_per_line(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nsecond document\n")
    (tmp_path / "b.txt").write_text("third, with ünïcode\n")
    out = tmp_path / "out"
    assert main(["text", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "-o", str(out)]) == 0
    _, raws = read_all(str(out), "text")
    assert [r.text for r in raws] == ["first document", "second document", "third, with ünïcode"]


def test_clear_errors(tmp_path, capsys):
    assert main(["image", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")]) == 2
    assert "nowhere' does not exist" in capsys.readouterr().err
    table = tmp_path / "t.csv"
    table.write_text("file,caption\nx.jpg,hello\n")
    assert main(["pair", str(table), "-o", str(tmp_path / "o")]) == 2
    assert "no column 'image'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["image", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 2
    assert "no image samples found" in capsys.readouterr().err
    assert not os.listdir(tmp_path / "o")  # no empty shard left behind
    assert parse_size("500MB") == 500_000_000 and parse_size("1GiB") == 2 ** 30


def test_missing_input_message_and_help_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "megatron_style.cli.make_shards", "text",
                        str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "missing.txt' does not exist" in r.stderr


def test_bench_loader_runs(capsys):
    from megatron_style.benchmarks import loader as bench_loader
    assert bench_loader.main(["--model", "tiny", "--images", "4", "--batches", "2",
                              "--shard-samples", "8", "--micro-batch-size", "3", "--workers", "0",
                              "--train-samples-per-s", "10"]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "loader / training = " in out
