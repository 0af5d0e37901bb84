"""A checkpoint directory: which checkpoints it holds, which are complete, and whether one is
intact. Every reader of checkpoint directories (resume, export, TP conversion, init_from, the
start-up checks) finds and checks checkpoints here.

    checkpoint.dir/
      step_00001000/            one checkpoint: DeepSpeed's files and rank_state_XXXXX.pt
        COMPLETE                the manifest, written last (see Manifest)
        UNLOADABLE              written by a rank that could not load it (see mark_unloadable)
      step_00002000.abandoned/  a checkpoint set aside at a resume (never loaded or pruned)
      latest                    the newest complete tag, for people and DeepSpeed's tools
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Optional

from megatron_style.files import fsync_dir, write_json, write_text

TAG_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
UNLOADABLE = "UNLOADABLE"
LATEST = "latest"
SET_ASIDE_SUFFIX = ".abandoned"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class Manifest:
    """What COMPLETE says: the step, the run it belongs to, the number of ranks that wrote it,
    and every file with its size in bytes. Checkpoints written before manifests existed have
    `files` None (COMPLETE held only the step)."""

    step: int
    run_id: str = ""
    world_size: int = 0
    init_from: str = ""         # the run's checkpoint.init_from (to tell its restarts apart)
    files: Optional[dict[str, int]] = None
    # Samples per optimizer step over all ranks, so that a resume on another number of ranks
    # keeps it (train/batch_plan.py); 0 in checkpoints written before it was recorded.
    global_batch: int = 0
    written_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @classmethod
    def read(cls, tag_dir: str) -> Optional["Manifest"]:
        """The manifest of `tag_dir`, or None when it is missing or unreadable (a crash between
        the rename and the fsync of the folder can leave an empty file on some file systems)."""
        try:
            with open(os.path.join(tag_dir, COMPLETE), encoding="utf-8") as f:
                d = json.load(f)
            return cls(step=int(d["step"]), run_id=str(d.get("run_id", "")),
                       world_size=int(d.get("world_size", 0)),
                       init_from=str(d.get("init_from", "")), files=d.get("files"),
                       written_at=str(d.get("written_at", "")),
                       global_batch=int(d.get("global_batch", 0)))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, tag_dir: str) -> None:
        write_json(os.path.join(tag_dir, COMPLETE), asdict(self))


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, tag) of every checkpoint with a readable manifest, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        if m and Manifest.read(os.path.join(ckpt_dir, name)) is not None:
            out.append((int(m.group(1)), name))
    return sorted(out)


def runs_in(ckpt_dir: str) -> dict[str, int]:
    """Run id -> the newest step it has a complete checkpoint of in `ckpt_dir`
    ("" for checkpoints written before run ids existed)."""
    runs: dict[str, int] = {}
    for step, tag in complete_checkpoints(ckpt_dir):
        m = Manifest.read(os.path.join(ckpt_dir, tag))
        if m is not None:
            runs[m.run_id] = max(step, runs.get(m.run_id, -1))
    return runs


def candidates(resume: str, ckpt_dir: str) -> list[tuple[str, str]]:
    """(load_dir, tag) to try resuming from, newest first; [] to start fresh.
    resume: "auto" (every complete checkpoint in ckpt_dir), "none", or a path (a step_XXXXXXXX
    directory: that one only; a directory holding them: all of its complete ones)."""
    if resume == "none":
        return []
    if resume == "auto":
        return [(ckpt_dir, tag) for _, tag in reversed(complete_checkpoints(ckpt_dir))]
    path = os.path.abspath(os.path.expanduser(resume.rstrip("/")))
    if TAG_RE.match(os.path.basename(path)) and Manifest.read(path) is not None:
        return [(os.path.dirname(path), os.path.basename(path))]
    found = complete_checkpoints(path)
    if found:
        return [(path, tag) for _, tag in reversed(found)]
    raise ValueError(f"checkpoint.resume={resume!r}: no complete checkpoint there (expected a "
                     f"step_XXXXXXXX directory containing {COMPLETE}, or a directory of them)")


def resolve(path: str) -> tuple[str, str]:
    """(load_dir, tag) of the newest complete checkpoint `path` names (a run's checkpoint.dir
    or one step_XXXXXXXX directory); for tools that read a checkpoint (export, conversion)."""
    found = candidates(path, path)
    if not found:
        raise ValueError(f"{path!r}: no complete checkpoint found (a step_XXXXXXXX directory "
                         f"holding {COMPLETE}, or a directory of them)")
    return found[0]


def problems(tag_dir: str, check_zip: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with the checkpoint in `tag_dir` ([] when nothing is): no manifest, an
    UNLOADABLE mark, files of the manifest missing or of another size. The files named in
    `check_zip` are also opened as zip archives (torch.save's format), which reads their
    central directory at the end of the file: a file cut short fails here, cheaply."""
    m = Manifest.read(tag_dir)
    if m is None:
        return [f"{COMPLETE} is missing or unreadable"]
    out = []
    mark = unloadable_reason(tag_dir)
    if mark:
        out.append(f"marked {UNLOADABLE} by an earlier attempt: {mark}")
    out += size_problems(tag_dir, m.files or {})
    for name in check_zip:
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            if m.files is None:
                out.append(f"{name} is missing")
            continue  # already reported from the manifest
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (OSError, zipfile.BadZipFile, ValueError) as e:
            out.append(f"{name} is not a whole torch file ({e})")
    return out


def size_problems(tag_dir: str, files: dict[str, int]) -> list[str]:
    """Files of `files` (name -> bytes) that are missing from `tag_dir` or of another size."""
    out = []
    for name, size in files.items():
        try:
            actual = os.path.getsize(os.path.join(tag_dir, name))
        except OSError:
            out.append(f"{name} is missing")
            continue
        if actual != size:
            out.append(f"{name} has {actual} bytes, the manifest says {size}")
    return out


def checkpoint_files(tag_dir: str) -> list[str]:
    """The .pt files of a checkpoint (the manifest's when there is one), sorted."""
    m = Manifest.read(tag_dir)
    if m is not None and m.files is not None:
        return sorted(n for n in m.files if n.endswith(".pt"))
    return sorted(n for n in os.listdir(tag_dir) if n.endswith(".pt"))


def mark_unloadable(tag_dir: str, rank: int, reason: str) -> None:
    """Record that `rank` could not load this checkpoint, so that the next start falls back
    to an older one instead of failing on this one again (best effort: this runs while the
    rank is failing)."""
    try:
        write_text(os.path.join(tag_dir, f"{UNLOADABLE}.rank{rank:05d}"), reason[:2000] + "\n")
    except OSError:
        pass


def unloadable_reason(tag_dir: str) -> str:
    try:
        marks = sorted(n for n in os.listdir(tag_dir) if n.startswith(UNLOADABLE))
    except OSError:
        return ""
    for n in marks:
        try:
            with open(os.path.join(tag_dir, n), encoding="utf-8", errors="replace") as f:
                return f"{n[len(UNLOADABLE) + 1:]}: {f.read().strip()}"
        except OSError:
            continue
    return ""


def set_aside(ckpt_dir: str, tag: str) -> str:
    """Rename a checkpoint out of the way (kept for inspection, never loaded or pruned)."""
    src = os.path.join(ckpt_dir, tag)
    dst = src + SET_ASIDE_SUFFIX
    n = 1
    while os.path.exists(dst):
        n += 1
        dst = f"{src}{SET_ASIDE_SUFFIX}.{n}"
    os.rename(src, dst)
    fsync_dir(ckpt_dir)
    return dst


def set_latest(ckpt_dir: str, tag: str) -> None:
    write_text(os.path.join(ckpt_dir, LATEST), tag)


def prune(ckpt_dir: str, keep_last: int) -> list[str]:
    """Remove all but the newest `keep_last` complete checkpoints, and leftovers of crashed
    saves older than the newest complete one. Call only once the newest is durable: it is
    never removed. Returns the tags removed."""
    complete = complete_checkpoints(ckpt_dir)
    if not complete:
        return []
    newest = complete[-1][0]
    removed = []
    for _, tag in complete[:-max(1, keep_last)]:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
        removed.append(tag)
    done = {t for _, t in complete}
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        if m and name not in done and int(m.group(1)) < newest:
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
            removed.append(name)
    if removed:
        fsync_dir(ckpt_dir)
    return removed


def check_one_run(resume: str, ckpt_dir: str, init_from: str = "") -> None:
    """Refuse to start a second run in a checkpoint.dir that holds another run's checkpoints:
    its pruning would delete them, and its saves would collide with them. Raises ValueError
    with what to do; run before anything starts."""
    runs = runs_in(ckpt_dir)
    if not runs:
        return
    newest = max(runs.values())
    held = (f"{ckpt_dir!r} already holds checkpoints of "
            + ("another run" if len(runs) == 1 else f"{len(runs)} runs")
            + f" (up to step {newest})")
    if resume == "auto":
        # A restart resumes the run that is there; a new run started from init_from into an
        # old run's folder would resume that run instead and quietly ignore init_from.
        there = Manifest.read(os.path.join(ckpt_dir, tag_for(newest)))
        if init_from and there is not None and there.files is not None \
                and os.path.abspath(there.init_from or ".") != os.path.abspath(init_from):
            raise ValueError(f"{held}, which did not start from checkpoint.init_from="
                             f"{init_from!r}: resuming would ignore init_from. Give the new "
                             "run its own checkpoint.dir")
        return
    if resume == "none":
        raise ValueError(f"{held}; checkpoint.resume=none would start a new run on top of them "
                         "(and prune them). Resume that run (checkpoint.resume=auto), or give "
                         "the new run its own checkpoint.dir")
    found = candidates(resume, ckpt_dir)  # ValueError when `resume` names nothing loadable
    load_dir = found[0][0]
    if os.path.abspath(load_dir) == os.path.abspath(ckpt_dir):
        return  # resuming the run in this folder from one of its own checkpoints
    source = Manifest.read(os.path.join(*found[0]))
    source_run = source.run_id if source else ""
    if set(runs) != {source_run} or not source_run:
        raise ValueError(f"{held}, and checkpoint.resume={resume!r} is a checkpoint of a "
                         f"different run; continuing it here would mix the two. Give it its "
                         "own checkpoint.dir")
