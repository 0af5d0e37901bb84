"""Process groups for tensor x data parallelism, and the `mpu` object DeepSpeed expects.

Layout: global rank = dp_rank * T + tp_rank. Tensor-parallel groups are runs of T consecutive
ranks, so with launchers that number ranks node by node (torchrun, deepspeed, Slurm block
distribution) a TP group never leaves a node and its all-reduces stay on NVLink. Data-parallel
groups take one rank from each TP group: {tp_rank, tp_rank + T, tp_rank + 2T, ...}.

    world 8, T = 2:   TP groups [0 1] [2 3] [4 5] [6 7]     DP groups [0 2 4 6] [1 3 5 7]

DeepSpeed is told about this through `ParallelState.mpu()`: ZeRO then partitions optimizer
state (and gradients, parameters) over the data-parallel group only, averages gradients over
it, and counts replicated parameters once when it computes the global gradient norm (ranks
other than tensor rank 0 skip parameters not tagged `tensor_model_parallel`).

    state = build_parallel_state(cfg.parallel.tensor)      # after torch.distributed init
    model = MaskedDataModel(cfg.model, tp=state.tp)
    engine, *_ = deepspeed.initialize(model=model, mpu=state, ...)
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch.distributed as dist

from megatron_style.parallel.mappings import TPGroup


def group_ranks(world_size: int, tensor_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(tensor-parallel groups, data-parallel groups) as lists of global ranks."""
    if tensor_size < 1:
        raise ValueError(f"parallel.tensor = {tensor_size}: must be >= 1")
    if world_size % tensor_size:
        raise ValueError(f"parallel.tensor = {tensor_size} does not divide the world size "
                         f"{world_size}; use a divisor of {world_size}")
    dp = world_size // tensor_size
    tensor = [list(range(d * tensor_size, (d + 1) * tensor_size)) for d in range(dp)]
    data = [list(range(t, world_size, tensor_size)) for t in range(tensor_size)]
    return tensor, data


class _DeepSpeedMPU:
    """The "model parallel unit" interface DeepSpeed queries (deepspeed.utils.groups,
    runtime/engine.py, zero/stage_1_and_2.py, stage3.py, runtime/utils.py). Model parallel
    means tensor parallel here: there is no pipeline parallelism.

    Deliberately absent: `initialize_sequence_parallel` (its presence makes DeepSpeed treat
    the object as a sequence-parallel unit and ignore the data-parallel group) and the
    sequence-parallel getters (DeepSpeed then falls back to the data-parallel group).
    The fields it reads (tensor_rank, tensor_group, data_size, ...) are ParallelState's."""

    # tensor (= model) parallel -------------------------------------------------------------
    def get_tensor_model_parallel_rank(self) -> int:
        return self.tensor_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tensor_size

    def get_tensor_model_parallel_group(self):
        return self.tensor_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.tensor_ranks[0]

    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    # data parallel -------------------------------------------------------------------------
    def get_data_parallel_rank(self) -> int:
        return self.data_rank

    def get_data_parallel_world_size(self) -> int:
        return self.data_size

    def get_data_parallel_group(self):
        return self.data_group

    def get_data_parallel_group_ranks(self) -> Sequence[int]:
        return list(self.data_ranks)

    # pipeline (none) -----------------------------------------------------------------------
    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


@dataclass(frozen=True)
class ParallelState(_DeepSpeedMPU):
    """This process's place in the tensor x data grid and the groups it belongs to. It is
    also DeepSpeed's `mpu`: pass it as `deepspeed.initialize(..., mpu=state)`."""

    rank: int
    world_size: int
    tensor_rank: int
    tensor_size: int
    tensor_group: Optional[dist.ProcessGroup]
    tensor_ranks: tuple[int, ...]
    data_rank: int
    data_size: int
    data_group: Optional[dist.ProcessGroup]
    data_ranks: tuple[int, ...]

    @property
    def tp(self) -> Optional[TPGroup]:
        """The group the model's parallel layers use; None when there is no tensor
        parallelism, so the model runs its plain single-process code."""
        if self.tensor_size == 1:
            return None
        return TPGroup(self.tensor_group, self.tensor_rank, self.tensor_size)

    # Short names used by the trainer.
    tp_group = tp
    dp_rank = property(lambda self: self.data_rank)
    dp_size = property(lambda self: self.data_size)
    dp_group = property(lambda self: self.data_group)

    def mpu(self) -> "ParallelState":
        return self

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tensor rank {self.tensor_rank}/"
                f"{self.tensor_size} {list(self.tensor_ranks)}, data rank {self.data_rank}/"
                f"{self.data_size} {list(self.data_ranks)}")


def build_parallel_state(tensor_size: int) -> ParallelState:
    """Create the process groups. Every rank must call this, in the same order relative to
    other group creations (torch.distributed requires all ranks to create every group).

    No sequence parallelism, by choice. It would split the replicated LayerNorm / residual
    regions over the tensor ranks. Here those regions work on the packed stream sorted by
    expert (per-modality norms, routed FFN), so it would need per-rank routes, padding of the
    stream to a multiple of T and a reorder around every all-gather / reduce-scatter, in model
    code. What it saves is small next to what activation checkpointing saves: giant, TP=2,
    16 images + 16 texts + 16 pairs per micro-batch, 14.2 GiB of activations -> 1.6 GiB with
    checkpointing; sequence parallelism would take off 2.2 GiB, or 0.6 GiB on top of
    checkpointing. `beit3-memory-plan` prints that amount for any setting, so the choice can be
    revisited with numbers."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("build_parallel_state needs torch.distributed to be initialised "
                           "first (deepspeed.init_distributed() or dist.init_process_group())")
    world, rank = dist.get_world_size(), dist.get_rank()
    tensor_lists, data_lists = group_ranks(world, tensor_size)
    _warn_if_tp_crosses_nodes(tensor_size)
    # new_subgroups_by_enumeration creates every group on every rank (as torch requires) and
    # returns the one this rank is in.
    tensor_group, _ = dist.new_subgroups_by_enumeration(tensor_lists)
    data_group, _ = dist.new_subgroups_by_enumeration(data_lists)
    tensor_ranks = next(r for r in tensor_lists if rank in r)
    data_ranks = next(r for r in data_lists if rank in r)
    return ParallelState(
        rank=rank, world_size=world,
        tensor_rank=tensor_ranks.index(rank), tensor_size=tensor_size,
        tensor_group=tensor_group, tensor_ranks=tuple(tensor_ranks),
        data_rank=data_ranks.index(rank), data_size=len(data_ranks),
        data_group=data_group, data_ranks=tuple(data_ranks))


def _warn_if_tp_crosses_nodes(tensor_size: int) -> None:
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE")
    if tensor_size > 1 and local and local.isdigit() and int(local) % tensor_size:
        warnings.warn(f"parallel.tensor = {tensor_size} does not divide the {local} processes "
                      "per node: some tensor-parallel groups span two nodes, and their "
                      "per-layer all-reduces go over the network", stacklevel=3)
