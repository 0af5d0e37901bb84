"""beit3-make-shards survives poison inputs and never loses the old shards: decompression
bombs (a 24 KB PNG claiming 14000^2 pixels made it crash) and files of other formats behind an
image name are skipped and counted as training would; --overwrite writes the new set aside and
replaces the old one only when complete, so a run that fails or is killed half-way leaves the
old set as it was."""
import io
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from PIL import Image

from megatron_style.cli.make_shards import main
from megatron_style.data.shards import resolve_shards
from tests.data.streaming_helpers import ROOT, jpeg_bytes

pytestmark = pytest.mark.faults


def png_claiming(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side), 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_bombs_and_other_formats_in_the_input_are_skipped_and_counted(tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(1))
    (src / "b-bomb.png").write_bytes(png_claiming(14000))   # Pillow refuses it: raised before
    (src / "c-bomb.png").write_bytes(png_claiming(13000))   # Pillow only warns: copied before
    (src / "d.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")  # EPS
    (src / "e.jpg").write_bytes(jpeg_bytes(2))
    out = tmp_path / "out"
    assert main(["image", str(src), "-o", str(out), "--verify"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 (image too large)" in err and "skipped 1 (unreadable image)" in err
    (shard,) = resolve_shards(str(out))
    with tarfile.open(shard) as t:
        assert sorted(m.name for m in t.getmembers()) == ["000000000.jpg", "000000001.jpg"]


def snapshot(folder):
    """The shards a reader sees in `folder` (not hidden ones), with their bytes."""
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))
            if not f.startswith(".")}


def written_since(t0, *folders):
    return [f for d in folders if os.path.isdir(d) for f in os.listdir(d)
            if f.endswith(".tar") and os.path.getmtime(os.path.join(d, f)) >= t0]


@pytest.fixture
def old_set(tmp_path):
    (tmp_path / "v1.txt").write_text("".join(f"old document {i}\n" for i in range(3)))
    out = str(tmp_path / "out")
    assert main(["text", str(tmp_path / "v1.txt"), "-o", out, "--max-samples", "1"]) == 0
    before = snapshot(out)
    assert sorted(before) == ["text-000000.tar", "text-000001.tar", "text-000002.tar"]
    return out, before


def test_overwrite_that_fails_half_way_keeps_the_old_set(tmp_path, old_set, capsys):
    out, before = old_set
    (tmp_path / "v2.txt").write_text("".join(f"new document {i}\n" for i in range(5)))
    (tmp_path / "v2-broken.txt").write_bytes(b"fine line\n\xff\xfe not utf-8\n")
    args = ["text", str(tmp_path / "v2.txt"), str(tmp_path / "v2-broken.txt"), "-o", out,
            "--max-samples", "1", "--overwrite"]
    assert main(args) == 2  # 6 new shards written, then the second file fails
    assert "not UTF-8" in capsys.readouterr().err
    assert snapshot(out) == before  # untouched, nothing half-written beside it
    # a complete new set replaces it whole
    assert main(["text", str(tmp_path / "v2.txt"), "-o", out, "--max-samples", "2",
                 "--overwrite"]) == 0
    assert sorted(snapshot(out)) == ["text-000000.tar", "text-000001.tar", "text-000002.tar"]
    assert snapshot(out) != before


def test_overwrite_killed_half_way_keeps_the_old_set(tmp_path, old_set):
    out, before = old_set
    fifo = str(tmp_path / "feed.txt")
    os.mkfifo(fifo)  # the input arrives as we write it, so the kill lands mid-write
    proc = subprocess.Popen([sys.executable, "-m", "megatron_style.cli.make_shards", "text",
                             fifo, "-o", out, "--max-samples", "1", "--overwrite"],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = os.path.join(out, ".text-partial")
    t0 = time.time() - 1
    with open(fifo, "w") as feed:
        for i in range(5):
            feed.write(f"new document {i}\n")
        feed.flush()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until new shards are being written
            if len(written_since(t0, out, staging)) >= 3:
                break
            time.sleep(0.05)
        else:
            proc.kill()
            pytest.fail("make_shards wrote no new shards within 60 s")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert snapshot(out) == before
    assert resolve_shards(out) == [os.path.join(out, f) for f in sorted(before)]
    # the next run clears what the killed one left
    (tmp_path / "v3.txt").write_text("third version\n")
    assert main(["text", str(tmp_path / "v3.txt"), "-o", out, "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["text-000000.tar"]
