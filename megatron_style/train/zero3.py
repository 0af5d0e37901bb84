"""What ZeRO-3 needs to know about the Multiway model.

ZeRO-3 keeps every parameter partitioned and gathers a module's OWN parameters around that
module's forward and backward (module hooks). The Multiway blocks apply the parameters of their
leaf modules (linears, norms, one per expert) themselves, through grouped ops, so those leaf
modules never run forward and ZeRO-3 would release their weights before backward needs them
("The size of tensor a (0) must match ..."). Registering them as external parameters of the
module whose forward uses them fixes that, at the right granularity:

  * each MultiwayBlock gathers all of its parameters for its forward and its backward (one
    layer at a time, what ZeRO-3 is for; activation checkpointing calls the block too);
  * everything else (embeddings, position tables, final norms, heads) belongs to the root
    module given to deepspeed.initialize.

The root module's forward must return tensors in a tuple, list, dict or NamedTuple: DeepSpeed
attaches its pre-backward hook (which gathers the root's parameters again) to those tensors
and cannot see inside other objects (it warns "A module has unknown inputs or outputs type").
"""
from __future__ import annotations

import torch.nn as nn


def register_zero3_parameters(root: nn.Module, blocks: nn.ModuleList) -> None:
    """Call before deepspeed.initialize with ZeRO stage 3. `root` is the module handed to
    DeepSpeed; `blocks` its transformer layers (model.beit3.layers)."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    in_blocks = set()
    for block in blocks:
        for p in block.parameters():
            register_external_parameter(block, p)
            in_blocks.add(id(p))
    for p in root.parameters():
        if id(p) not in in_blocks:
            register_external_parameter(root, p)
