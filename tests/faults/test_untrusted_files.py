"""Files from outside the run never run code: a crafted pickle handed in as init_from, a VQ-KD
or k-means tokenizer, a TP conversion input or a checkpoint directory to export is refused
with a clear error, and its payload does not run. What released files legitimately hold
(tensors, argparse.Namespace) still loads."""
import argparse
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_style.files import UnsafeFileError, load_untrusted
from tests.train.launch import ROOT, TINY, explain, pretrain, run_dirs

pytestmark = pytest.mark.faults


class Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(path, marker, wrap=lambda p: {"model": {"w": torch.zeros(2)}, "x": p}):
    torch.save(wrap(Payload(str(marker))), path)
    return path


def test_the_payload_would_run_with_a_full_pickle(tmp_path):
    """The crafted file is real: loading it the unsafe way does run the command."""
    marker = tmp_path / "ran"
    torch.load(crafted(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_load_untrusted_refuses_and_names_the_object(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(UnsafeFileError, match="posix.system|os.system|system"):
        load_untrusted(str(crafted(tmp_path / "evil.pt", marker)), "model file")
    assert not marker.exists()


def test_released_style_files_with_their_arguments_load(tmp_path):
    path = tmp_path / "vqkd.pth"
    torch.save({"model": {"w": torch.ones(3)}, "args": argparse.Namespace(lr=1e-3, codebook=8192)},
               path)
    obj = load_untrusted(str(path))
    assert obj["args"].codebook == 8192 and torch.equal(obj["model"]["w"], torch.ones(3))


def test_tokenizer_files_are_refused(tmp_path):
    from megatron_style.data.visual_tokenizers.kmeans import KMeansTokenizer
    from megatron_style.data.visual_tokenizers.vqkd import _read_state_dict
    marker = tmp_path / "ran"
    path = str(crafted(tmp_path / "evil.pt", marker))
    with pytest.raises(UnsafeFileError):
        _read_state_dict(path)
    with pytest.raises(UnsafeFileError):
        KMeansTokenizer.load(path)
    assert not marker.exists()


def test_convert_tp_refuses_a_crafted_input(tmp_path):
    marker = tmp_path / "ran"
    path = crafted(tmp_path / "rank0.pt", marker)
    p = subprocess.run([sys.executable, "-m", "megatron_style.cli.convert_tp", "--preset",
                        "tiny", "--tensor", "1", str(path), "--out", str(tmp_path / "o.pt")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "not loaded, because unpickling it could run code" in p.stderr
    assert not marker.exists() and not (tmp_path / "o.pt").exists()


@pytest.mark.multiproc
def test_init_from_a_crafted_file_stops_the_run_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = crafted(tmp_path / "beit3_base_patch16_224.pth", marker)
    p = pretrain([*TINY, *run_dirs(tmp_path), "steps=1", f"checkpoint.init_from={path}"])
    assert p.returncode == 1, explain(p)
    assert "rank 0: FAILED: UnsafeFileError" in p.stderr, explain(p)
    assert not marker.exists()


@pytest.mark.multiproc
def test_export_of_a_crafted_checkpoint_directory_refuses(tmp_path):
    p = pretrain([*TINY, *run_dirs(tmp_path), "steps=1"])
    assert p.returncode == 0, explain(p)
    tag = tmp_path / "run" / "ckpt" / "step_00000001"
    bad = tmp_path / "downloaded" / "step_00000001"
    shutil.copytree(tag, bad)
    marker = tmp_path / "ran"
    states = bad / "mp_rank_00_model_states.pt"
    sd = torch.load(states, weights_only=False)
    sd["extra"] = Payload(str(marker))
    torch.save(sd, states)
    (bad / "COMPLETE").unlink()
    (bad / "COMPLETE").write_text('{"step": 1}')  # a manifest without sizes, as old ones are
    for argv in (["-m", "megatron_style.cli.export", str(bad), "--out", str(tmp_path / "o.pt")],
                 ["-m", "megatron_style.cli.convert_tp", "--tensor", "1", str(bad),
                  "--out", str(tmp_path / "o.pt")]):
        p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 2, p.stderr
        assert "could run code" in p.stderr, p.stderr
    assert not marker.exists() and not (tmp_path / "o.pt").exists()
