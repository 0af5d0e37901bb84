"""Export a training checkpoint as one consolidated fp32 model file.

    beit3-export runs/demo/checkpoints --out demo_fp32.pt
    beit3-export runs/base/checkpoints/step_00100000 --layout released \
        --out beit3_base_pretrained.pth
    beit3-export runs/itc_tune_base/checkpoints --layout retrieval \
        --out beit3_base_itc_patch16_224.pth

Our layout: {"model": state_dict, "config": <recipe YAML>, "step": N}. The released layout
(decoupled models only) is what microsoft/unilm's BEiT-3 fine-tuning code loads:
{"model": {"beit3.encoder...": ...}} plus the MDM heads as mlm_head.* / mim_head.*, and
with the ITC heads of a run trained with objective.itc, vision_head.weight,
language_head.weight and logit_scale. The retrieval layout is unilm BEiT3ForRetrieval's
exactly (beit3.* and those three; no MDM heads), like the released *_itc_* files.
Reading checkpoints is megatron_style/checkpoint/ (fp32.py gathers the weights); loading model
files into a model (`checkpoint.init_from`) is checkpoint/model_files.py.
"""
from __future__ import annotations

import os

import torch

from megatron_style.checkpoint.directory import resolve
from megatron_style.files import save_torch
from megatron_style.checkpoint.fp32 import (checkpoint_meta, checkpoint_pretrain_config,
                                            consolidated_state_dict, export_fp32)


def export(path: str, out: str, layout: str = "ours") -> str:
    """Write the newest complete checkpoint `path` names (a run's checkpoint.dir or one
    step_XXXXXXXX directory) as one model file; durable: a crash leaves no partial `out`."""
    if layout not in ("ours", "released", "retrieval"):
        raise ValueError(f"layout {layout!r} is not one of ours, released, retrieval")
    tag_dir = os.path.join(*resolve(path))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if layout == "ours":
        # Streamed: one tensor in memory at a time, read from memory-mapped ZeRO shards, any
        # ZeRO stage and TP degree (megatron_style/checkpoint/fp32.py).
        return export_fp32(tag_dir, out, extra=checkpoint_meta(tag_dir))
    from megatron_style.model.pretraining import MaskedDataModel
    from megatron_style.model.released_checkpoint import (export_released_state_dict,
                                                          export_retrieval_state_dict)
    cfg = checkpoint_pretrain_config(tag_dir)
    if cfg is None:
        raise ValueError(f"{tag_dir} does not record its config; --layout released needs it")
    if cfg.model.attention != "decoupled":
        raise ValueError(f"--layout {layout} needs a decoupled model; this one is "
                         f"{cfg.model.attention!r}")
    sd, _ = consolidated_state_dict(tag_dir)
    from megatron_style.config.objective import model_heads
    with torch.device("meta"):
        # With the run's ITC heads, the file is unilm BEiT3ForRetrieval's layout (vision_head,
        # language_head, logit_scale) beside the MDM heads.
        model = MaskedDataModel(cfg.model, heads=model_heads(cfg))
    model.load_state_dict(sd, assign=True)
    if layout == "retrieval":
        if not hasattr(model, "itc"):
            raise ValueError(f"--layout retrieval needs the ITC heads, but {tag_dir} was "
                             "trained without objective.itc; use --layout released")
        save_torch({"model": export_retrieval_state_dict(model)}, out)
    else:
        save_torch({"model": export_released_state_dict(model)}, out)
    return out
