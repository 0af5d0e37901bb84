"""Writing a checkpoint: collective, and COMPLETE only when it is.

    writer = CheckpointWriter(engine, cfg.checkpoint.dir, keep_last=3, run_id=run_id)
    path = writer.save(step, client_state, rank_state)     # every rank calls it

The protocol, in the order every rank runs it (the same collectives on every rank whatever
fails, so that no failure leaves a rank waiting for another):
  1. rank 0 checks the target (a complete checkpoint of this step written by this process
     is kept as it is; one written by anything else is an error, never skipped silently),
     removes a half-written attempt, and tells the others;
  2. DeepSpeed writes its files through `DurableCheckpointEngine`, which fsyncs each file and
     records its size, and records a failed write (a full disk) instead of raising, so that
     DeepSpeed still reaches its own barrier on every rank; each rank then writes its
     rank_state file the same way and fsyncs the folder;
  3. the ranks exchange what they wrote and what failed; if anything failed, rank 0 removes
     the attempt and every rank raises CheckpointError naming the ranks and causes;
  4. rank 0 checks every file of the manifest exists with its size, writes COMPLETE (temp +
     fsync + rename + fsync of the folder), points `latest` at it, and only then prunes old
     checkpoints: the newest complete one is never removed, and nothing is removed before
     the new one is durable.
A crash anywhere before step 4's rename leaves a folder without COMPLETE, which resume ignores
and the next successful save removes.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any, Callable, Optional

import torch.distributed as dist

from megatron_style.checkpoint.directory import (Manifest, complete_checkpoints, prune,
                                                 set_latest, size_problems, tag_for)
from megatron_style.files import fsync_dir, fsync_file
from megatron_style.checkpoint.rank_state import rank_file


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the ranks and causes."""


class DurableCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine (`engine.checkpoint_engine`): every file saved is
    fsynced and recorded with its size; a failed write is recorded, not raised (see the module
    docstring, step 2). Everything else is passed through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reset()

    def reset(self) -> None:
        self.written: dict[str, int] = {}
        self.error: Optional[str] = None

    def save(self, state_dict: Any, path: str) -> None:
        if self.error is not None:
            return  # the first failure is the one to report; the disk is probably full
        try:
            self.inner.save(state_dict, path)
            fsync_file(path)
            self.written[os.path.basename(path)] = os.path.getsize(path)
        except Exception as e:  # noqa: BLE001 - reported to every rank, then raised there
            self.error = f"writing {os.path.basename(path)}: {type(e).__name__}: {e}"
            with contextlib.suppress(OSError):
                os.remove(path)
            # torch.save reports a full disk as "unexpected pos"; say what is left.
            with contextlib.suppress(OSError):
                free = shutil.disk_usage(os.path.dirname(path)).free
                self.error += f" ({free / 2**20:.1f} MiB free on that file system)"

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        try:
            self.inner.makedirs(path, exist_ok=exist_ok)
        except Exception as e:  # noqa: BLE001
            self.error = self.error or f"creating {path}: {type(e).__name__}: {e}"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Collective: run `fn` on rank 0 only and give its result to every rank; an exception
    there is raised on every rank (as CheckpointError), so that all ranks go the same way."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    box: list[Any] = [None, None]
    if rank == 0:
        try:
            box[0] = fn()
        except Exception as e:  # noqa: BLE001
            box[1] = f"{type(e).__name__}: {e}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise CheckpointError(f"rank 0: {box[1]}")
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Collective: every rank's `obj`, in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class CheckpointWriter:
    def __init__(self, engine: Any, ckpt_dir: str, keep_last: int, run_id: str,
                 init_from: str = "", log: Callable[[str], None] = print,
                 global_batch: int = 0) -> None:
        self.engine, self.dir, self.keep_last, self.run_id, self.log = (
            engine, ckpt_dir, keep_last, run_id, log)
        self.global_batch = global_batch  # recorded in every manifest
        self.init_from = os.path.abspath(init_from) if init_from else ""
        if not isinstance(engine.checkpoint_engine, DurableCheckpointEngine):
            engine.checkpoint_engine = DurableCheckpointEngine(engine.checkpoint_engine)
        self.durable: DurableCheckpointEngine = engine.checkpoint_engine
        self.written_here: set[str] = set()  # tags this process wrote (same on every rank)

    def save(self, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]) -> str:
        """Collective. Write checkpoint `step` and return its path; raises CheckpointError on
        every rank when any rank could not write its part (the previous checkpoints are kept)."""
        tag = tag_for(step)
        path = os.path.join(self.dir, tag)
        if tag in self.written_here:
            return path  # nothing has changed since this process wrote it
        on_rank0(lambda: self._prepare(path))
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.durable.reset()
        self.engine.save_checkpoint(self.dir, tag=tag, client_state=dict(client_state),
                                    save_latest=False)
        self.durable.save(rank_state, rank_file(path, rank))
        try:
            fsync_dir(path)
        except OSError as e:
            self.durable.error = self.durable.error or f"fsync of {path}: {e}"
        reports = gather((self.durable.error, self.durable.written))
        failed = [(r, err) for r, (err, _) in enumerate(reports) if err]
        if failed:
            on_rank0(lambda: shutil.rmtree(path, ignore_errors=True))
            raise CheckpointError(
                f"checkpoint {path} was not written: "
                + "; ".join(f"rank {r}: {err}" for r, err in failed)
                + f". {self._previous_intact(step)}")
        files: dict[str, int] = {}
        for _, written in reports:
            files.update(written)
        world = dist.get_world_size() if dist.is_initialized() else 1
        on_rank0(lambda: self._commit(path, Manifest(step=step, run_id=self.run_id,
                                                     world_size=world, init_from=self.init_from,
                                                     files=files,
                                                     global_batch=self.global_batch)))
        self.written_here.add(tag)
        return path

    def _previous_intact(self, step: int) -> str:
        older = [t for s, t in complete_checkpoints(self.dir) if s < step]
        return (f"The previous checkpoint {os.path.join(self.dir, older[-1])} is intact."
                if older else "There is no earlier checkpoint.")

    def _prepare(self, path: str) -> None:
        os.makedirs(self.dir, exist_ok=True)
        existing = Manifest.read(path)
        if existing is not None:
            who = f"run {existing.run_id!r}" if existing.run_id else "an earlier run"
            raise CheckpointError(
                f"{path} already holds a complete checkpoint of {who} (this run is "
                f"{self.run_id!r}); it is not overwritten. Two runs are writing to "
                "checkpoint.dir: give each its own")
        if os.path.exists(path):  # a half-written attempt (no COMPLETE)
            shutil.rmtree(path)

    def _commit(self, path: str, manifest: Manifest) -> None:
        manifest.files = dict(sorted(manifest.files.items()))
        # A rank on another node may have written a file that is not visible yet, or a file
        # may have been cut short behind our back: COMPLETE only for what is really there.
        wrong = size_problems(path, manifest.files)
        if wrong:
            shutil.rmtree(path, ignore_errors=True)
            raise CheckpointError(f"checkpoint {path} is not whole after writing: "
                                  + "; ".join(wrong))
        manifest.write(path)
        fsync_dir(self.dir)
        set_latest(self.dir, os.path.basename(path))
        removed = prune(self.dir, self.keep_last)
        if removed:
            self.log(f"checkpoints: removed {', '.join(removed)} (checkpoint.keep_last="
                     f"{self.keep_last})")
