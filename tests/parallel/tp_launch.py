"""Run a function on N gloo processes (one spawn per scenario) and collect what each returns.

Workers return plain objects (tensors, dicts); the test process makes the comparisons, so a
failure shows up as an ordinary pytest assertion with both values."""
from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)  # 2 cores shared by every worker
    # A collective that one rank never joins (the bug several of these tests look for) fails
    # after this, rather than hanging the suite until pytest's own timeout.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=180))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_workers(fn: Callable, world: int, *args: Any) -> list[Any]:
    """fn(rank, world, *args) on `world` processes; returns the per-rank results. `fn` must be
    importable (module level) for the spawn start method."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, _free_port(), out_dir, fn, args), nprocs=world,
                           join=True, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]
