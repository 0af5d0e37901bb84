"""Resume a DeepSpeed checkpoint on a different number of data-parallel ranks.

ZeRO partitions the fp32 master weights and Adam moments over the data-parallel group, and
DeepSpeed refuses to load them into a group of another size. Its universal checkpoint format
stores every parameter's fp32 weight and moments whole; any data-parallel layout can load it.
So when the sizes differ, rank 0 converts the checkpoint once (deepspeed.checkpoint.
ds_to_universal, written inside the checkpoint's own directory so that pruning old checkpoints
removes it too), every rank waits, and the engine loads it with `load_universal`.

    if needs_resharding(engine, load_dir, tag):
        client_state = load_resharded(engine, load_dir, tag)

Tensor parallelism: the conversion also merges tensor-parallel slices when the checkpoint
says how (DeepSpeed's `universal_checkpoint_info`: which parameters are replicated, which
split along dim 1). `universal_checkpoint_info(model)` derives that from our layers' tags;
the trainer attaches it as `model.universal_checkpoint_info` before deepspeed.initialize
(DeepSpeed saves that attribute with every checkpoint). DeepSpeed's loader cuts the merged
tensors back into equal chunks, so a model with an uneven vocabulary split (64010 over 4)
resumes on another data-parallel size only at TP degrees that divide its vocabularies, and
only under ZeRO-1/2 (DeepSpeed's ZeRO-3 universal loader does not cut TP slices). To change
the TP degree itself, `convert.py` re-splits the model weights.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
from typing import Any, Optional

import torch.distributed as dist
import torch.nn as nn

from megatron_style.files import write_json
from megatron_style.checkpoint.fp32 import client_state, optimizer_shards

UNIVERSAL_SUBDIR = "universal"
_DONE = "UNIVERSAL_COMPLETE"


def saved_layout(tag_dir: str) -> Optional[tuple[int, int]]:
    """(data-parallel size, tensor-parallel size) of a ZeRO checkpoint; None without ZeRO
    optimizer shards (ZeRO-0 keeps the whole optimizer in the model-states file)."""
    shards = optimizer_shards(tag_dir)
    if not shards:
        return None
    return len({d for by_dp in shards.values() for d in by_dp}), len(shards)


def needs_resharding(engine, load_dir: str, tag: str) -> bool:
    layout = saved_layout(os.path.join(load_dir, tag))
    return layout is not None and layout[0] != engine.dp_world_size


def universal_dir(load_dir: str, tag: str) -> str:
    """Where the universal copy of load_dir/tag lives: load_dir/tag/universal/tag."""
    return os.path.join(load_dir, tag, UNIVERSAL_SUBDIR, tag)


def convert_to_universal(load_dir: str, tag: str) -> str:
    """Write the universal copy (once; a finished copy is reused). Not collective."""
    out = universal_dir(load_dir, tag)
    if os.path.isfile(os.path.join(out, _DONE)):
        return out
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out, ignore_errors=True)       # a half-written earlier attempt
    os.makedirs(out)
    args = argparse.Namespace(input_folder=os.path.join(load_dir, tag), output_folder=out,
                              num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True,
                              # Checkpoints of TP=1 models carry no universal_checkpoint_info;
                              # without tensor slices there is nothing it would have to say.
                              inject_missing_state=True)
    # Its progress bars and prints go to a log next to the result, not into the run's output.
    with open(os.path.join(out, "conversion.log"), "w") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        ds_to_universal.main(args)
    write_json(os.path.join(out, _DONE), {"source": os.path.join(load_dir, tag)})
    return out


def load_resharded(engine, load_dir: str, tag: str) -> dict[str, Any]:
    """Collective. Load load_dir/tag into `engine` whatever data-parallel size wrote it;
    returns the client state. Weights, fp32 masters and Adam moments are restored exactly;
    the learning-rate schedule and data position are the caller's (they live in the client
    state and the per-rank files)."""
    layout = saved_layout(os.path.join(load_dir, tag))
    if layout is not None and layout[1] > 1:
        if engine.zero_optimization_stage() == 3:
            # DeepSpeed's ZeRO-3 universal loader does not cut tensor-parallel slices.
            raise NotImplementedError(
                f"{os.path.join(load_dir, tag)}: resuming a tensor-parallel ZeRO-3 checkpoint "
                f"on another number of data-parallel ranks ({layout[0]} -> "
                f"{engine.dp_world_size}) is not supported; resume on {layout[0]} data-parallel "
                "ranks, or use ZeRO-1/2 with tensor parallelism")
        _require_tp_info(os.path.join(load_dir, tag))
    rank = dist.get_rank() if dist.is_initialized() else 0
    error = [None]
    if rank == 0:
        print(f"{os.path.join(load_dir, tag)} was saved by {layout[0] if layout else '?'} data-"
              f"parallel ranks, this run has {engine.dp_world_size}: re-splitting the ZeRO state "
              f"through a universal checkpoint in {universal_dir(load_dir, tag)}", flush=True)
        try:
            convert_to_universal(load_dir, tag)
        except Exception as e:  # tell the other ranks instead of leaving them in the barrier
            error[0] = f"{type(e).__name__}: {e}"
    if dist.is_initialized():
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise RuntimeError(f"converting {os.path.join(load_dir, tag)} to a universal checkpoint "
                           f"failed: {error[0]}")
    cfg = engine._config
    old = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = True   # DeepSpeed reads this flag at load time only
    try:
        _, client_state = engine.load_checkpoint(os.path.dirname(universal_dir(load_dir, tag)),
                                                 tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
    finally:
        cfg.load_universal_checkpoint = old
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the universal copy of {os.path.join(load_dir, tag)}")
    return client_state


def _require_tp_info(tag_dir: str) -> None:
    if not client_state(tag_dir).get("universal_checkpoint_info"):
        raise RuntimeError(f"{tag_dir} was written with tensor parallelism but without "
                           "universal_checkpoint_info, so its slices cannot be merged; attach "
                           "megatron_style.checkpoint.universal.universal_checkpoint_info(model) "
                           "as model.universal_checkpoint_info before deepspeed.initialize")


def universal_checkpoint_info(model: nn.Module) -> dict[str, Any]:
    """DeepSpeed's description of how tensor-parallel slices merge, from our tags: parameters
    not tagged `tensor_model_parallel` are replicated, `partition_dim` 1 is row parallelism,
    the rest (dim 0, DeepSpeed's default) are concatenated along rows."""
    from deepspeed.checkpoint.constants import (
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
        TP_REPLICATED_PARAMETER_PATTERNS,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )
    replicated, rows = [], []
    for name, p in model.named_parameters():
        pattern = "^" + re.escape(name) + "$"
        if not getattr(p, "tensor_model_parallel", False):
            replicated.append(pattern)
        elif p.partition_dim == 1:
            rows.append(pattern)
    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            TP_REPLICATED_PARAMETER_PATTERNS: replicated,
            PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: rows}
