"""Resuming: the newest checkpoint that every rank can load, or an older one, said so.

    resumed = resume_engine(engine, cfg.checkpoint.resume, cfg.checkpoint.dir, log)
    if resumed: step, client, rank_state = resumed.step, resumed.client, resumed.rank_state

For each candidate, newest first (checkpoint.resume: auto = the complete ones in
checkpoint.dir), every rank checks before anything is loaded: the manifest's files exist with
their sizes, its share of the files opens as a whole torch file (a file cut short fails
here), and its own rank_state file reads. The ranks exchange what they found; when any rank
found a problem, all of them go on to the next older candidate, and the log says which
checkpoint was passed over and why. Only then does DeepSpeed load. A failure inside DeepSpeed's
load (a file that is corrupt inside) cannot be agreed on safely (the other ranks may be inside
DeepSpeed's collectives), so the failing rank marks the checkpoint UNLOADABLE and fails the
run; the next start passes that checkpoint over.

Once loaded, complete checkpoints in checkpoint.dir newer than the one resumed from (passed
over as broken, or left behind by resuming from an older one on purpose) are renamed
`step_XXXXXXXX.abandoned`: kept for inspection, never loaded or pruned, and they cannot
collide with the checkpoints this run writes next.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.distributed as dist

from megatron_style.checkpoint.directory import (UNLOADABLE, Manifest, candidates,
                                                 checkpoint_files, complete_checkpoints,
                                                 mark_unloadable, problems, set_aside)
from megatron_style.checkpoint.rank_state import (rank_file, read_rank_state, saved_world_size,
                                                  set_rng_state)
from megatron_style.checkpoint.save import CheckpointError, gather, on_rank0


@dataclass
class Resumed:
    tag_dir: str
    step: int
    client: dict[str, Any]
    # This rank's own state (RNG, loader position); None when the checkpoint was written by
    # another number of ranks (then `load_loader_states` gives every old rank's loader).
    rank_state: Optional[dict[str, Any]]
    run_id: str
    passed_over: list[str] = field(default_factory=list)


def _rank() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_problems(tag_dir: str, rank: int, world: int) -> list[str]:
    """What this rank finds wrong with the checkpoint before loading it."""
    try:
        files = checkpoint_files(tag_dir)
        found = problems(tag_dir, check_zip=tuple(files[rank::world]))
        if not found and saved_world_size(tag_dir) == world:
            read_rank_state(rank_file(tag_dir, rank))
        return found
    except Exception as e:  # noqa: BLE001 - any failure to read is a reason to pass it over
        return [f"{type(e).__name__}: {e}"]


def resume_engine(engine: Any, resume: str, ckpt_dir: str,
                  log: Callable[[str], None] = print) -> Optional[Resumed]:
    """Collective. Load the newest loadable checkpoint into `engine` (model, optimizer, this
    rank's RNG); None when there is nothing to resume from. Raises CheckpointError when there
    are checkpoints but none can be loaded: a run never silently starts over on top of them."""
    rank, world = _rank()
    found = on_rank0(lambda: candidates(resume, ckpt_dir))  # one view of the folder for all
    passed_over: list[str] = []
    for load_dir, tag in found:
        tag_dir = os.path.join(load_dir, tag)
        reports = gather(local_problems(tag_dir, rank, world))
        bad = _summarise(reports)
        if bad:
            passed_over.append(f"{tag_dir}: {bad}")
            log(f"WARNING: checkpoint {tag_dir} cannot be loaded ({bad}); trying an older one")
            continue
        try:
            client, rank_state = _load(engine, load_dir, tag, world)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            mark_unloadable(tag_dir, rank, reason)
            raise CheckpointError(
                f"rank {rank}: loading checkpoint {tag_dir} failed: {reason}. It is now marked "
                f"{UNLOADABLE}: the next start passes it over and resumes from an older "
                "checkpoint") from e
        step = int(client["step"])
        manifest = Manifest.read(tag_dir)
        run_id = str(client.get("run_id") or (manifest.run_id if manifest else ""))
        on_rank0(lambda: _set_aside_newer(ckpt_dir, step, log))
        return Resumed(tag_dir, step, client, rank_state, run_id, passed_over)
    if found:
        raise CheckpointError(
            f"none of the {len(found)} complete checkpoints could be loaded ("
            + "; ".join(passed_over) + "). Not starting from scratch over them: move them "
            "out of checkpoint.dir, or start a new run with another checkpoint.dir")
    return None


def saved_global_batch(resume: str, ckpt_dir: str) -> tuple[int, str]:
    """Collective. (global batch, checkpoint path) recorded by the checkpoint a resume would
    start from (the newest candidate), read before the engine is built because the gradient
    accumulation is fixed there; (0, "") when there is none or it predates the record."""
    def read() -> tuple[int, str]:
        try:
            found = candidates(resume, ckpt_dir)
        except ValueError:  # a bad checkpoint.resume is said by resume_engine itself
            return 0, ""
        if not found:
            return 0, ""
        tag_dir = os.path.join(*found[0])
        manifest = Manifest.read(tag_dir)
        return (manifest.global_batch if manifest else 0), tag_dir
    return on_rank0(read)


def _summarise(reports: list[list[str]]) -> str:
    """One line of what the ranks found; the same problem seen by every rank is said once."""
    seen: dict[str, list[int]] = {}
    for r, found in enumerate(reports):
        for p in found:
            seen.setdefault(p, []).append(r)
    parts = []
    for p, ranks in seen.items():
        who = "every rank" if len(ranks) == len(reports) and len(ranks) > 1 else \
            "rank " + ",".join(str(r) for r in ranks)
        parts.append(f"{who}: {p}")
    return "; ".join(parts)


def _load(engine: Any, load_dir: str, tag: str, world: int
          ) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    # A checkpoint written by another number of data-parallel ranks goes through DeepSpeed's
    # universal format, which re-splits the ZeRO optimizer state (universal.py).
    from megatron_style.checkpoint.universal import load_resharded, needs_resharding
    if needs_resharding(engine, load_dir, tag):
        client = load_resharded(engine, load_dir, tag)
    else:
        _, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(load_dir, tag)}")
    tag_dir = os.path.join(load_dir, tag)
    if saved_world_size(tag_dir) != world:
        return client, None
    rank_state = read_rank_state(rank_file(tag_dir, _rank()[0]))
    set_rng_state(rank_state.pop("rng"))
    return client, rank_state


def _set_aside_newer(ckpt_dir: str, step: int, log: Callable[[str], None]) -> None:
    for s, tag in complete_checkpoints(ckpt_dir):
        if s > step:
            moved = set_aside(ckpt_dir, tag)
            log(f"checkpoint {tag} is newer than the one resumed from (step {step}): renamed "
                f"to {os.path.basename(moved)}, kept but no longer used")


def load_loader_states(tag_dir: str) -> list[dict[str, Any]]:
    """Collective. Every saving rank's data-loader state (to carry the data position over to
    another number of ranks). Rank 0 reads the small per-rank files and sends them to the
    others, so a shared file system sees N reads rather than N x N."""
    def read_all() -> list[dict[str, Any]]:
        n = saved_world_size(tag_dir)
        return [read_rank_state(rank_file(tag_dir, r))["loader"] for r in range(n)]
    return on_rank0(read_all)
