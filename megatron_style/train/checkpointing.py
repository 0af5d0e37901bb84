"""Checkpoints through DeepSpeed, with what an exact resume needs and crash-safe bookkeeping.

Layout of checkpoint.dir:
    step_00001000/         DeepSpeed's files for that step (model, optimizer shards) with our
                           shared state (step, guard counters) as DeepSpeed's client state
      rank_state_00003.pt  per-rank state: RNG states and this rank's data-loader position
      COMPLETE             written last, by rank 0, after every rank finished writing
    latest                 name of the newest COMPLETE checkpoint (replaced atomically)

A crash while saving leaves a directory without COMPLETE: it is ignored when resuming and
removed by the next successful save, so the latest good checkpoint is never damaged.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

TAG_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        if m and os.path.isfile(os.path.join(ckpt_dir, name, COMPLETE)):
            out.append((int(m.group(1)), name))
    return sorted(out)


def resolve_resume(resume: str, ckpt_dir: str) -> Optional[tuple[str, str]]:
    """(load_dir, tag) to resume from, or None to start fresh.
    resume: "auto" (latest complete in ckpt_dir, if any), "none", or a checkpoint path
    (a step_XXXXXXXX directory, or a directory holding them)."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(ckpt_dir)
        return (ckpt_dir, found[-1][1]) if found else None
    path = os.path.abspath(resume.rstrip("/"))
    if TAG_RE.match(os.path.basename(path)) and os.path.isfile(os.path.join(path, COMPLETE)):
        return os.path.dirname(path), os.path.basename(path)
    found = complete_checkpoints(path)
    if found:
        return path, found[-1][1]
    raise ValueError(f"checkpoint.resume={resume!r}: no complete checkpoint there (expected a "
                     f"step_XXXXXXXX directory containing {COMPLETE}, or a directory of them)")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: str, step: int, client_state: dict[str, Any],
         rank_state: dict[str, Any], keep_last: int) -> str:
    """Collective: every rank calls it. `client_state` is shared by all ranks (rank 0's copy
    is kept); `rank_state` is this rank's own (its data position). Returns the tag written."""
    tag = tag_for(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = os.path.join(ckpt_dir, tag)
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return tag  # this step is already saved; never rewrite a good checkpoint in place
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        if os.path.isdir(path):  # a half-written attempt at this same step
            shutil.rmtree(path)
    _barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=dict(client_state), save_latest=False)
    # DeepSpeed keeps one client state (rank 0's); what differs per rank goes in its own file.
    torch.save({"rng": rng_state(), **rank_state}, _rank_file(path, rank))
    _barrier()
    if rank == 0:
        with open(os.path.join(path, COMPLETE), "w") as f:
            json.dump({"step": step}, f)
        _atomic_write(os.path.join(ckpt_dir, "latest"), tag)
        _prune(ckpt_dir, keep_last)
    _barrier()
    return tag


def _rank_file(path: str, rank: int) -> str:
    return os.path.join(path, f"rank_state_{rank:05d}.pt")


def saved_world_size(load_dir: str, tag: str) -> int:
    path = os.path.join(load_dir, tag)
    return sum(1 for n in os.listdir(path) if n.startswith("rank_state_"))


def load_loader_states(load_dir: str, tag: str) -> list[dict[str, Any]]:
    """Collective. Every saving rank's data-loader state (to carry the data position over to
    another number of ranks). Rank 0 reads the small per-rank files and sends them to the
    others, so a shared file system sees N reads rather than N x N."""
    states: list[Any] = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        path = os.path.join(load_dir, tag)
        n = saved_world_size(load_dir, tag)
        states = [[torch.load(_rank_file(path, r), weights_only=False)["loader"]
                   for r in range(n)]]
    if dist.is_initialized():
        dist.broadcast_object_list(states, src=0)
    return states[0]


def load(engine, load_dir: str, tag: str) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """Collective. Restores model and optimizer; returns (shared client state, this rank's
    state or None when the checkpoint was written by a different number of ranks)."""
    # A checkpoint written by another number of data-parallel ranks goes through DeepSpeed's
    # universal format, which re-splits the ZeRO optimizer state (megatron_style/parallel/elastic.py).
    from megatron_style.parallel.elastic import load_resharded, needs_resharding
    if needs_resharding(engine, load_dir, tag):
        client_state = load_resharded(engine, load_dir, tag)
    else:
        _, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(load_dir, tag)}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved_world_size(load_dir, tag) != world:
        return client_state, None
    rank_state = torch.load(_rank_file(os.path.join(load_dir, tag), rank), weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return client_state, rank_state


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(ckpt_dir: str, keep_last: int) -> None:
    complete = complete_checkpoints(ckpt_dir)
    newest = complete[-1][0] if complete else -1
    for step, tag in complete[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
    for name in os.listdir(ckpt_dir):  # leftovers of crashed saves older than the newest
        m = TAG_RE.match(name)
        full = os.path.join(ckpt_dir, name)
        if m and int(m.group(1)) < newest and not os.path.isfile(os.path.join(full, COMPLETE)):
            shutil.rmtree(full, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
