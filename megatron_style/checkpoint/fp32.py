"""The fp32 weights of a DeepSpeed checkpoint (any ZeRO stage, any tensor-
parallel degree), written one tensor at a time.

Reading: the ZeRO files are opened memory-mapped (nothing is read until used). A parameter's
fp32 master lives in pieces: ZeRO-1/2 cut each parameter group's flat vector into equal
partitions, one per data-parallel rank; ZeRO-3 cuts every parameter into equal partitions.
`fp32_parameters` yields the parameters in order, each assembled from only the pieces that
hold it, merged across tensor-parallel ranks with `convert.py`'s rules; the previous one can
be freed before the next is built.

Writing: `torch.save` needs every tensor at once. Instead the file is first written as a
skeleton (torch.serialization.skip_data: the layout of a normal torch.save file with the data
left blank, from shape-only tensors), then memory-mapped with MAP_SHARED and filled tensor by
tensor. The result is an ordinary file for torch.load.

    export_fp32(tag_dir, "model_fp32.pt", extra={"step": 1000, "config": yaml_text})
    sd, meta = consolidated_state_dict("runs/demo/checkpoints")   # in memory, for loading

This is the one place that gathers fp32 weights from DeepSpeed's files: export, TP
conversion and `checkpoint.init_from` of a checkpoint directory all read through it.
"""
from __future__ import annotations

import glob
import math
import mmap
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from megatron_style.checkpoint.directory import resolve
from megatron_style.files import fsync_dir, load_untrusted
from megatron_style.config import ModelConfig
from megatron_style.checkpoint.tp_split import split_plan

# DeepSpeed's names for the optimizer shard of (data-parallel rank, tensor-parallel rank).
_OPTIM_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _deepspeed_globals() -> list[Any]:
    """The few classes DeepSpeed pickles into its files besides tensors and plain data."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load(path: str) -> dict:
    """A DeepSpeed checkpoint file, memory-mapped, weights-only: exporting or converting a
    checkpoint directory that came from elsewhere runs none of its code."""
    with torch.serialization.safe_globals(_deepspeed_globals()):
        return load_untrusted(path, "DeepSpeed checkpoint file", mmap=True)


@dataclass
class _TensorRank:
    """The fp32 parameters of one tensor-parallel rank, readable one at a time."""

    shapes: dict[str, torch.Size]           # parameter order as DeepSpeed saved it
    read: Callable[[str], torch.Tensor]


def _zero12_rank(model_file: str, optim_files: list[str]) -> _TensorRank:
    model = _load(model_file)
    param_shapes = model["param_shapes"]                        # one dict per param group
    optim = [_load(f)["optimizer_state_dict"] for f in optim_files]   # by data-parallel rank
    paddings = optim[0].get("param_alignment_paddings")
    where: dict[str, tuple[int, int, int]] = {}                 # name -> (group, offset, numel)
    for g, shapes in enumerate(param_shapes):
        offset = 0
        for j, (name, shape) in enumerate(shapes.items()):
            n = math.prod(shape)
            where[name] = (g, offset, n)
            offset += n + (paddings[g][j] if paddings is not None else 0)

    def read(name: str) -> torch.Tensor:
        g, start, n = where[name]
        parts, pos = [], 0
        for sd in optim:                                        # partitions in rank order
            flat = sd["single_partition_of_fp32_groups"][g]
            lo, hi = max(start, pos), min(start + n, pos + flat.numel())
            if lo < hi:
                parts.append(flat[lo - pos:hi - pos])
            pos += flat.numel()
        return torch.cat(parts).view(_shape(param_shapes, name)).clone()

    return _TensorRank({k: v for s in param_shapes for k, v in s.items()}, read)


def _zero3_rank(model_files: list[str], optim_files: list[str]) -> _TensorRank:
    param_shapes = _load(model_files[0])["param_shapes"]
    flat = [_load(f)["optimizer_state_dict"]["fp32_flat_groups"] for f in optim_files]
    world = len(flat)
    # Every parameter is padded to a multiple of `world` and split evenly; each rank's flat
    # groups hold its partitions of the parameters back to back, in `param_shapes` order.
    group_sizes = [t.numel() for t in flat[0]]
    where: dict[str, tuple[int, int]] = {}                      # name -> (offset, numel)
    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            n = math.prod(shape)
            where[name] = (offset, n)
            offset += -(-n // world)

    def rank_slice(r: int, start: int, length: int) -> torch.Tensor:
        out, pos = [], 0
        for t, size in zip(flat[r], group_sizes):
            lo, hi = max(start, pos), min(start + length, pos + size)
            if lo < hi:
                out.append(t[lo - pos:hi - pos])
            pos += size
        return torch.cat(out) if len(out) > 1 else out[0]

    def read(name: str) -> torch.Tensor:
        start, n = where[name]
        per = -(-n // world)
        full = torch.cat([rank_slice(r, start, per) for r in range(world)])
        return full[:n].view(_shape(param_shapes, name)).clone()

    return _TensorRank({k: v for s in param_shapes for k, v in s.items()}, read)


def _module_rank(model_file: str) -> _TensorRank:
    """No ZeRO shards (ZeRO-0): the model weights themselves."""
    module = _load(model_file)["module"]
    return _TensorRank({k: v.shape for k, v in module.items()}, lambda k: module[k].float().clone())


def _shape(param_shapes, name) -> torch.Size:
    for s in param_shapes:
        if name in s:
            return torch.Size(s[name])
    raise KeyError(name)


def optimizer_shards(tag_dir: str) -> dict[int, dict[int, str]]:
    """DeepSpeed's ZeRO optimizer files: tensor-parallel rank -> data-parallel rank -> path
    (empty without ZeRO, which keeps the optimizer in the model-states file)."""
    optim: dict[int, dict[int, str]] = {}
    for f in glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):
        m = _OPTIM_RE.search(os.path.basename(f))
        if m:
            optim.setdefault(int(m.group(2)), {})[int(m.group(1))] = f
    return optim


def _ranks(tag_dir: str) -> list[_TensorRank]:
    optim = optimizer_shards(tag_dir)
    if not optim:
        files = sorted(f for f in glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))
        if not files:
            raise ValueError(f"{tag_dir}: no DeepSpeed model or optimizer states in this directory")
        return [_module_rank(f) for f in files]
    ranks = []
    for tp in sorted(optim):
        by_dp = [optim[tp][d] for d in sorted(optim[tp])]
        zero3 = sorted(glob.glob(os.path.join(tag_dir, f"zero_pp_rank_*_mp_rank_{tp:02d}_model_states.pt")))
        if zero3:
            ranks.append(_zero3_rank(zero3, by_dp))
        else:
            ranks.append(_zero12_rank(os.path.join(tag_dir, f"mp_rank_{tp:02d}_model_states.pt"), by_dp))
    return ranks


def tensor_rank_state_dicts(tag_dir: str) -> list[dict[str, torch.Tensor]]:
    """The fp32 state dict of each tensor-parallel rank, unmerged (for convert.py)."""
    return [{k: r.read(k) for k in r.shapes} for r in _ranks(tag_dir)]


def fp32_parameters(tag_dir: str, cfg: Optional[ModelConfig] = None
                    ) -> tuple[dict[str, torch.Size], Iterator[tuple[str, torch.Tensor]]]:
    """(full shapes, iterator of (name, fp32 tensor)) for the checkpoint in `tag_dir`.
    With more than one tensor-parallel rank, `cfg` (the model config) says how to merge."""
    ranks = _ranks(tag_dir)
    if len(ranks) == 1:
        r = ranks[0]
        return dict(r.shapes), ((k, r.read(k)) for k in r.shapes)
    if cfg is None:
        raise ValueError(f"{tag_dir} holds {len(ranks)} tensor-parallel ranks: the model config is "
                         "needed to merge them")
    plan = split_plan(cfg, len(ranks))
    shapes = {k: torch.Size(plan[k].full_shape) for k in ranks[0].shapes}

    def merged() -> Iterator[tuple[str, torch.Tensor]]:
        for k in ranks[0].shapes:
            split = plan[k]
            if split.dim is None:
                yield k, ranks[0].read(k)
            else:
                yield k, torch.cat([r.read(k) for r in ranks], dim=split.dim)

    return shapes, merged()


def client_state(tag_dir: str) -> dict[str, Any]:
    """What the trainer stored with DeepSpeed's model states (step, config YAML, run id...)."""
    files = sorted(glob.glob(os.path.join(tag_dir, "*mp_rank_00_model_states.pt")))
    if not files:
        raise ValueError(f"{tag_dir}: no DeepSpeed model states file in this directory")
    return _load(files[0])


def checkpoint_pretrain_config(tag_dir: str):
    """The recipe (PretrainConfig) the checkpoint was trained with, or None if not recorded."""
    text = client_state(tag_dir).get("config")
    if not text:
        return None
    import yaml

    from megatron_style.config import PretrainConfig, from_dict
    return from_dict(PretrainConfig, yaml.safe_load(text))


def checkpoint_config(tag_dir: str) -> Optional[ModelConfig]:
    """The model config the trainer stored in the checkpoint's client state, if any."""
    if not glob.glob(os.path.join(tag_dir, "*mp_rank_00_model_states.pt")):
        return None
    cfg = checkpoint_pretrain_config(tag_dir)  # a refused (crafted) file raises
    return cfg.model if cfg is not None else None


def write_streaming(path: str, shapes: dict[str, torch.Size],
                    tensors: Iterator[tuple[str, torch.Tensor]],
                    extra: Optional[dict[str, Any]] = None, key: str = "model") -> None:
    """torch.save({key: {name: tensor}, **extra}) holding one tensor in memory at a time."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tmp = f"{path}.tmp.{os.getpid()}"
    with FakeTensorMode():                  # shapes only: no memory behind these
        skeleton = {k: torch.empty(s, dtype=torch.float32) for k, s in shapes.items()}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save({key: skeleton, **(extra or {})}, tmp)
    del skeleton
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        target = torch.load(tmp, mmap=True, weights_only=True)[key]
    written = set()
    for name, t in tensors:
        if name not in target:
            raise KeyError(f"{name!r} is not in the announced shapes")
        target[name].copy_(t)
        written.add(name)
        del t
    missing = set(shapes) - written
    del target
    if missing:
        os.remove(tmp)
        raise ValueError(f"no data for {sorted(missing)[:5]}")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def export_fp32(tag_dir: str, out: str, extra: Optional[dict[str, Any]] = None,
                cfg: Optional[ModelConfig] = None) -> str:
    """Write {"model": fp32 state dict, **extra} for the checkpoint in `tag_dir`, streaming."""
    shapes, tensors = fp32_parameters(tag_dir, cfg or checkpoint_config(tag_dir))
    write_streaming(out, shapes, tensors, extra)
    return out


def checkpoint_meta(tag_dir: str) -> dict[str, Any]:
    """The trainer's step and config from the checkpoint's client state."""
    client = client_state(tag_dir)
    return {k: client[k] for k in ("step", "config") if k in client}


def consolidated_state_dict(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole fp32 state dict in memory (merged over tensor-parallel ranks, any ZeRO stage)
    and the client state's step and config, for `path`: a run's checkpoint.dir (its newest
    complete checkpoint) or one step_XXXXXXXX directory."""
    load_dir, tag = resolve(path)
    tag_dir = os.path.join(load_dir, tag)
    _, tensors = fp32_parameters(tag_dir, checkpoint_config(tag_dir))
    return {k: v.detach().float().contiguous() for k, v in tensors}, checkpoint_meta(tag_dir)
