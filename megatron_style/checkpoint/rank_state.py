"""Per-rank state of a checkpoint (`rank_state_XXXXX.pt`): the random generators and the data
loader's position, which differ per rank where DeepSpeed keeps one client state.

Stored as tensors and plain Python values only, so that `torch.load(..., weights_only=True)`
reads it (numpy's and Python's generator states are taken apart into ints and a tensor).
Files written before that (numpy arrays inside) are still read, as the run's own files.
"""
from __future__ import annotations

import os
import pickle
import random
from typing import Any

import numpy as np
import torch


def rank_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"rank_state_{rank:05d}.pt")


def saved_world_size(tag_dir: str) -> int:
    return sum(1 for n in os.listdir(tag_dir) if n.startswith("rank_state_") and n.endswith(".pt"))


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached"]))
    else:  # written before rank states were weights-only loadable: numpy's own tuple
        np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_rank_state(path: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Older files hold numpy arrays; they are this run's own files, written by this code.
        return torch.load(path, map_location="cpu", weights_only=False)
