"""`beit3-convert-tp`: change the tensor-parallel degree of model files or of a trainer
checkpoint (the merging and splitting itself is megatron_style/checkpoint/tp_split.py).

Inputs are per-rank state dict files (a plain state dict, or one under "module" / "model"),
read weights-only (they may come from anywhere), or one trainer checkpoint directory at any
ZeRO stage, which brings its own model config. Outputs are written durably: a crash leaves
the old output or none, never a part.

    beit3-convert-tp --preset giant --tensor 1 rank0.pt rank1.pt --out model.pt
    beit3-convert-tp --config configs/pretrain/giant.yaml --tensor 4 model.pt --out tp4/
    beit3-convert-tp runs/giant/checkpoints/step_00100000 --tensor 1 --out model.pt
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from megatron_style.files import load_untrusted, save_torch

StateDict = dict[str, Any]


def _unwrap(obj: Any, path: str) -> StateDict:
    if isinstance(obj, dict):
        for key in ("module", "model"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"{path}: expected a state dict, or a dict holding one under 'module' or "
                     "'model'")


def read_shards(inputs: Sequence[str]) -> list[StateDict]:
    """Files in tensor-rank order, or one DeepSpeed checkpoint directory (a step_XXXXXXXX
    directory of the trainer; any ZeRO stage: the fp32 master weights are read)."""
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        from megatron_style.checkpoint.fp32 import tensor_rank_state_dicts
        return tensor_rank_state_dicts(inputs[0])
    for f in inputs:
        if not os.path.isfile(f):
            raise ValueError(f"input {f!r} does not exist")
    return [_unwrap(load_untrusted(f, "model file"), f) for f in inputs]


def write_shards(shards: list[StateDict], out: str) -> list[str]:
    if len(shards) == 1:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_torch(shards[0], out)
        return [out]
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"tp_rank_{r:02d}.pt") for r in range(len(shards))]
    for sd, p in zip(shards, paths):
        save_torch(sd, p)
    return paths
