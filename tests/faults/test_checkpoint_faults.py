"""Checkpoints under the faults a cluster produces: a disk that fills during a save, a newest
checkpoint cut short or corrupt (on every rank or on one), a crash between checkpoints. What is
promised: no checkpoint is marked COMPLETE unless every file of it is there, nothing good is
pruned, and a restart resumes from the newest checkpoint every rank can load, saying which one
it passed over and why."""
import json
import os
import shutil
import signal
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from fault_launch import TINY, Run, checkpoint_dirs, complete_and_whole, wait_for
from megatron_style.train.export import export
from tests.train.launch import explain, metrics, pretrain, run_dirs

pytestmark = [pytest.mark.faults, pytest.mark.multiproc]


def losses(tmp_path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(tmp_path)}


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 9 MiB (tmpfs): one tiny checkpoint fits, two do not."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_during_a_save_marks_nothing_complete_and_keeps_the_last_good(tmp_path, small_disk):
    ckpt = small_disk / "ckpt"
    args = [*TINY, f"checkpoint.dir={ckpt}", f"logging.dir={tmp_path / 'run' / 'tb'}",
            "steps=6", "checkpoint.every_steps=1", "checkpoint.keep_last=1"]
    t0 = time.monotonic()
    p = pretrain(args, ranks=2, timeout=600)
    elapsed = time.monotonic() - t0
    assert p.returncode == 1, explain(p)
    out = p.stdout + p.stderr
    assert "was not written" in out and "MiB free on that file system" in out, explain(p)
    assert "step_00000001" in out and "is intact" in out, explain(p)
    # Every checkpoint still there is whole; the good one was not pruned for the failed one.
    dirs = checkpoint_dirs(ckpt)
    assert [d.name for d in dirs] == ["step_00000001"], dirs
    assert complete_and_whole(dirs[0])
    assert (ckpt / "latest").read_text() == "step_00000001"
    print(f"disk full at the second save: ended in {elapsed:.0f} s (start-up included)")
    # A restart resumes from it (and, with no room to save, runs without saving).
    p = pretrain([*args, "checkpoint.save=false", "stop_at_step=3"], ranks=2, timeout=600)
    assert p.returncode == 0, explain(p)
    assert "resumed from" in p.stdout and "step_00000001 at step 1" in p.stdout, explain(p)


def three_checkpoints(tmp_path, ranks=1, extra=()):
    args = [*TINY, *run_dirs(tmp_path), "checkpoint.every_steps=1", "checkpoint.keep_last=5",
            *extra]
    p = pretrain([*args, "steps=3"], ranks=ranks)
    assert p.returncode == 0, explain(p)
    return args, tmp_path / "run" / "ckpt"


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    args, ckpt = three_checkpoints(tmp_path)
    straight = losses(tmp_path)
    model = ckpt / "step_00000003" / "mp_rank_00_model_states.pt"
    with open(model, "r+b") as f:
        f.truncate(model.stat().st_size // 2)
    p = pretrain([*args, "steps=5"])
    assert p.returncode == 0, explain(p)
    assert "checkpoint" in p.stdout and "step_00000003 cannot be loaded" in p.stdout, explain(p)
    assert "mp_rank_00_model_states.pt has" in p.stdout, explain(p)
    assert "step_00000002 at step 2" in p.stdout, explain(p)
    # Continued from step 2 exactly: step 3 is trained again, to the same loss.
    assert abs(losses(tmp_path)[3] - straight[3]) < 1e-6
    assert (ckpt / "step_00000003.abandoned").is_dir()
    assert complete_and_whole(ckpt / "step_00000005")


def cut_central_directory(path: Path) -> None:
    """Zero the end of a zip file (its central directory), keeping its size: only a rank that
    opens this file can tell it is broken."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size - 64)
        f.write(b"\0" * 64)


def test_a_file_only_one_rank_can_tell_is_broken_makes_every_rank_fall_back(tmp_path):
    args, ckpt = three_checkpoints(tmp_path, ranks=2)
    cut_central_directory(ckpt / "step_00000003" / "rank_state_00001.pt")
    p = pretrain([*args, "steps=4"], ranks=2)
    assert p.returncode == 0, explain(p)
    assert "step_00000003 cannot be loaded (rank " in p.stdout, explain(p)
    assert "rank_state_00001.pt is not a whole torch file" in p.stdout, explain(p)
    assert "step_00000002 at step 2" in p.stdout, explain(p)


def corrupt_pickle(path: Path) -> None:
    """Garbage in the pickled part of a torch file, same size, the zip still whole: the file
    can only be found broken by loading it."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)  # the local header's name and extra-field lengths
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        f.write(b"\xff" * min(16, info.file_size))


def test_a_checkpoint_that_fails_inside_the_load_is_passed_over_at_the_next_start(tmp_path):
    args, ckpt = three_checkpoints(tmp_path)
    corrupt_pickle(ckpt / "step_00000003" / "mp_rank_00_model_states.pt")
    p = pretrain([*args, "steps=4"])
    assert p.returncode == 1, explain(p)
    assert "rank 0: FAILED" in p.stderr and "marked UNLOADABLE" in p.stderr, explain(p)
    p = pretrain([*args, "steps=4"])
    assert p.returncode == 0, explain(p)
    assert "marked UNLOADABLE by an earlier attempt" in p.stdout, explain(p)
    assert "step_00000002 at step 2" in p.stdout, explain(p)


def test_after_a_crash_every_step_is_logged_once_and_as_json(tmp_path):
    args = [*TINY, *run_dirs(tmp_path), "checkpoint.every_steps=3"]
    run = Run([*args, "steps=100000"], tmp_path)
    run.wait_for_line("step 5/", timeout=300)
    run.kill()  # SIGKILL: the steps logged after the last checkpoint (3, 6, ...) are lost
    # Tiny steps take milliseconds: the run may be past step 5 when the kill lands, so the
    # resumed run is sized from what the killed one logged (its last line may be cut short).
    logged = []
    for line in (tmp_path / "run" / "tb" / "metrics.jsonl").read_text().splitlines():
        try:
            logged.append(json.loads(line)["step"])
        except ValueError:
            pass
    last = max(logged)
    assert last >= 5
    total = last + 3
    p = pretrain([*args, f"steps={total}"], env={"BEIT3_INJECT_NAN_STEPS": str(last + 2)})
    assert p.returncode == 0, explain(p)
    lines = (tmp_path / "run" / "tb" / "metrics.jsonl").read_text().splitlines()

    def no_nan(name):
        raise AssertionError(f"{name} is not JSON")
    rows = [json.loads(line, parse_constant=no_nan) for line in lines]
    assert [r["step"] for r in rows] == list(range(1, total + 1)), [r["step"] for r in rows]
    assert rows[last + 1]["loss"] is None  # the injected NaN, logged as JSON null


def test_signal_during_start_up_is_kept_and_saved(tmp_path):
    run = Run([*TINY, *run_dirs(tmp_path), "steps=50"], tmp_path)
    # Send SIGUSR1 as soon as the trainer catches it (its handler is the first thing it
    # installs), long before the model and engine exist.
    wait_for(lambda: _catches(run.proc.pid, signal.SIGUSR1), 60, lambda: run.output)
    os.kill(run.proc.pid, signal.SIGUSR1)
    code = run.wait(timeout=300)
    out = run.output
    assert code == 75, out[-3000:]
    assert "stop requested (SIGUSR1 during start-up)" in out, out[-3000:]
    assert complete_and_whole(tmp_path / "run" / "ckpt" / "step_00000000")


def test_signal_with_checkpoint_save_false_exits_4_not_75(tmp_path):
    run = Run([*TINY, *run_dirs(tmp_path), "steps=100000", "checkpoint.save=false"], tmp_path)
    run.wait_for_line("step 2/", timeout=300)
    os.kill(run.proc.pid, signal.SIGUSR1)
    code = run.wait(timeout=120)
    assert code == 4, run.output[-3000:]
    assert "no checkpoint written (checkpoint.save is false)" in run.output
    assert not (tmp_path / "run" / "ckpt").exists()


def _catches(pid: int, sig: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(mask & (1 << (sig - 1)))


def test_a_second_run_in_the_same_directory_is_refused(tmp_path):
    args, ckpt = three_checkpoints(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    p = pretrain([*args, "steps=3", "checkpoint.resume=none"])
    assert p.returncode == 2, explain(p)
    assert "already holds checkpoints of another run (up to step 3)" in p.stderr, explain(p)
    init = tmp_path / "init.pt"
    export(str(ckpt), str(init))
    p = pretrain([*args, "steps=3", f"checkpoint.init_from={init}"])
    assert p.returncode == 2, explain(p)
    assert "did not start from checkpoint.init_from" in p.stderr, explain(p)
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")} == before
    # The same recipe with its own directory starts from the export.
    p = pretrain([*TINY, *run_dirs(tmp_path, "second"), "steps=1", f"checkpoint.init_from={init}"])
    assert p.returncode == 0, explain(p)


def test_restart_of_an_init_from_run_resumes_it(tmp_path):
    args, ckpt = three_checkpoints(tmp_path)
    init = tmp_path / "init.pt"
    export(str(ckpt), str(init))
    shutil.rmtree(tmp_path / "run")
    args = [*args, f"checkpoint.init_from={init}"]
    assert pretrain([*args, "steps=2"]).returncode == 0
    p = pretrain([*args, "steps=3"])  # the requeued job: same command, later
    assert p.returncode == 0, explain(p)
    assert "step_00000002 at step 2" in p.stdout, explain(p)
