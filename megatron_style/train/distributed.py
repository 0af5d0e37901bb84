"""Rank and world from whichever launcher started us, and the process group.

deepspeed / torchrun set RANK, WORLD_SIZE, LOCAL_RANK (MASTER_ADDR/PORT too). Under Slurm's
srun only SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID exist; cluster/pretrain.sh exports
MASTER_ADDR and MASTER_PORT. A plain `python -m ...` is a world of one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str


def read_env() -> DistEnv:
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        world = int(e["WORLD_SIZE"])
        return DistEnv(int(e["RANK"]), world, int(e.get("LOCAL_RANK", 0)),
                       int(e.get("LOCAL_WORLD_SIZE", world)), "torchrun/deepspeed")
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
        world = int(e["SLURM_NTASKS"])
        nodes = int(e.get("SLURM_JOB_NUM_NODES", e.get("SLURM_NNODES", 1)))
        return DistEnv(int(e["SLURM_PROCID"]), world, int(e.get("SLURM_LOCALID", 0)),
                       max(1, world // max(1, nodes)), "slurm")
    if "OMPI_COMM_WORLD_RANK" in e:
        world = int(e["OMPI_COMM_WORLD_SIZE"])
        return DistEnv(int(e["OMPI_COMM_WORLD_RANK"]), world,
                       int(e.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                       int(e.get("OMPI_COMM_WORLD_LOCAL_SIZE", world)), "mpi")
    return DistEnv(0, 1, 0, 1, "single")


def init_distributed(env: DistEnv) -> torch.device:
    """Export the standard variables, pick the device, start the process group through
    DeepSpeed (NCCL on CUDA, gloo on CPU)."""
    import logging

    import deepspeed

    # DeepSpeed logs every engine detail at INFO on every rank; our own lines say what matters.
    if os.environ.get("BEIT3_DEEPSPEED_LOG", "warning") == "warning":
        deepspeed.utils.logger.setLevel(logging.WARNING)

    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # A world of one talks to nobody: any free port will do, so two single-process runs
        # on one machine do not collide on a fixed default.
        os.environ["MASTER_PORT"] = str(_free_port() if env.world_size == 1 else 29500)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        # Ranks on one CPU host share its cores; oversubscribing threads slows everyone down.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False)
    release_cpu_comm_buffer()
    return device


SHM_DIR = "/dev/shm"


def release_cpu_comm_buffer() -> None:
    """Collective. Remove the name of this rank's DeepSpeed CPU all-reduce buffer.

    On CPU, DeepSpeed's shared-memory comm op gives every rank a 66 MB POSIX shared-memory
    buffer named after the user, master address and port and the rank, and never unlinks it:
    each CPU run would leave 66 MB per rank in /dev/shm, for good, until a machine that runs
    many (a CI machine, a laptop running the tests) has no memory left. DeepSpeed's start-up
    returns only after a rank has mapped every peer's buffer, so once all ranks are past a
    barrier the names can go: the mappings stay valid, and the memory is freed when the last
    process using it exits, even if it crashes."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass  # on GPU, or a DeepSpeed without the CPU comm op: nothing was created


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
