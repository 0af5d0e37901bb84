"""Export a training checkpoint as one consolidated fp32 model file, and load model files.

    python -m megatron_style.train.export runs/demo/checkpoints --out demo_fp32.pt
    python -m megatron_style.train.export runs/base/checkpoints/step_00100000 --layout released \
        --out beit3_base_pretrained.pth

Our layout: {"model": state_dict, "config": <recipe YAML>, "step": N}. The released layout
(decoupled models only) is what microsoft/unilm's BEiT-3 fine-tuning code loads:
{"model": {"beit3.encoder...": ...}} plus the MDM heads as mlm_head.* / mim_head.*.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Any, Optional

import torch
import torch.nn as nn

from megatron_style.config import ConfigError, PretrainConfig, from_dict
from megatron_style.train.checkpointing import COMPLETE, resolve_resume


def _checkpoint_tag_dir(path: str) -> tuple[str, str]:
    found = resolve_resume(path, path)
    if found is None:
        raise ValueError(f"{path!r}: no complete checkpoint found (a step_XXXXXXXX directory "
                         f"holding {COMPLETE}, or a directory of them)")
    return found


def read_checkpoint_config(path: str) -> PretrainConfig:
    """The recipe a checkpoint was trained with (stored in its client state)."""
    import yaml

    load_dir, tag = _checkpoint_tag_dir(path)
    states = sorted(glob.glob(os.path.join(load_dir, tag, "mp_rank_*_model_states.pt")))
    if not states:
        raise ValueError(f"{os.path.join(load_dir, tag)} has no DeepSpeed model states file")
    sd = torch.load(states[0], map_location="cpu", weights_only=False)
    cfg = from_dict(PretrainConfig, yaml.safe_load(sd["config"]))
    return cfg


def consolidated_state_dict(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """fp32 weights of the whole model from a DeepSpeed checkpoint (any ZeRO stage), and the
    checkpoint's client state."""
    load_dir, tag = _checkpoint_tag_dir(path)
    tag_dir = os.path.join(load_dir, tag)
    states = sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))
    if len(states) > 1:
        from megatron_style.parallel.convert import merge_checkpoint_tp
        return merge_checkpoint_tp(tag_dir)
    client = torch.load(states[0], map_location="cpu", weights_only=False)
    if glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_optim_states.pt")):
        # ZeRO keeps the fp32 master weights partitioned in the optimizer files.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        sd = get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=tag)
    else:
        sd = {k: v.float() for k, v in client["module"].items()}
    meta = {k: client[k] for k in ("step", "config") if k in client}
    return {k: v.float().contiguous() for k, v in sd.items()}, meta


def load_model_file(model: nn.Module, path: str) -> None:
    """Initialise `model` from our export, a released BEiT-3 file, or a training checkpoint."""
    if os.path.isdir(path):
        sd, _ = consolidated_state_dict(path)
    else:
        raw = torch.load(path, map_location="cpu", weights_only=False)
        sd = raw.get("model", raw.get("module", raw)) if isinstance(raw, dict) else raw
    if any(k.startswith(("beit3.encoder.", "encoder.layers.")) for k in sd):
        from megatron_style.model.released_checkpoint import load_released_state_dict
        load_released_state_dict(model, sd)
        return
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit the model: missing {missing[:10]}"
                         f"{'...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                         f"{'...' if len(unexpected) > 10 else ''}")


def export(path: str, out: str, layout: str = "ours") -> str:
    if layout == "ours":
        # Streamed: one tensor in memory at a time, read from memory-mapped ZeRO shards, any
        # ZeRO stage and TP degree (megatron_style/parallel/consolidate.py).
        from megatron_style.parallel.consolidate import checkpoint_meta, export_fp32
        load_dir, tag = _checkpoint_tag_dir(path)
        tag_dir = os.path.join(load_dir, tag)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        return export_fp32(tag_dir, out, extra=checkpoint_meta(tag_dir))
    sd, meta = consolidated_state_dict(path)
    if layout == "released":
        from megatron_style.model.pretraining import MaskedDataModel
        from megatron_style.model.released_checkpoint import export_released_state_dict
        cfg = read_checkpoint_config(path)
        if cfg.model.attention != "decoupled":
            raise ValueError(f"--layout released needs a decoupled model; this one is "
                             f"{cfg.model.attention!r}")
        with torch.device("meta"):
            model = MaskedDataModel(cfg.model)
        model.load_state_dict(sd, assign=True)
        payload = {"model": export_released_state_dict(model)}
    elif layout == "ours":
        payload = {"model": sd, **meta}
    else:
        raise ValueError(f"layout {layout!r} is not one of ours, released")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, out)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="beit3-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint.dir of a run, or one step_XXXXXXXX directory in it")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--layout", choices=["ours", "released"], default="ours")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.layout)
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # mmap: counting does not read the (possibly huge) file into memory
    n = sum(v.numel() for v in torch.load(out, map_location="cpu", weights_only=False,
                                          mmap=True)["model"].values())
    print(f"wrote {out}: {n / 1e6:.1f}M parameters, {args.layout} layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
