"""Initialising a model from a file that may come from anywhere (`checkpoint.init_from`): our
export, a released BEiT-3 file, or a trainer checkpoint directory. Files are read weights-only
(megatron_style/files.py): a crafted file is refused, its code never runs."""
from __future__ import annotations

import os

import torch.nn as nn

from megatron_style.files import load_untrusted


def read_model_file(path: str) -> dict:
    """The state dict in `path` (a file holding one, or one under "model" / "module"), or of
    the newest complete checkpoint when `path` is a checkpoint directory."""
    if os.path.isdir(path):
        from megatron_style.checkpoint.fp32 import consolidated_state_dict
        return consolidated_state_dict(path)[0]
    raw = load_untrusted(path, "model file")
    sd = raw.get("model", raw.get("module", raw)) if isinstance(raw, dict) else raw
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict (or one under 'model' / 'module'), "
                         f"got {type(sd).__name__}")
    return sd


def load_model_file(model: nn.Module, path: str) -> list[str]:
    """Initialise `model` from our export, a released BEiT-3 file, or a training checkpoint.
    Returns the report for the log: what was loaded and, for released files, what was ignored,
    resized or created and why (released_checkpoint.fit_released_state_dict). Any released
    BEiT-3 file loads: pretrained, ITC-tuned, fine-tuned, at any image size."""
    sd = read_model_file(path)
    if any(k.startswith(("beit3.encoder.", "encoder.layers.")) for k in sd):
        from megatron_style.model.released_checkpoint import (fit_released_state_dict,
                                                              load_released_state_dict)
        fitted, notes = fit_released_state_dict(model, sd)
        load_released_state_dict(model, fitted)
        return [f"init_from {path}: released BEiT-3 layout, {len(fitted)} tensors loaded"] + \
            [f"init_from: {n}" for n in notes]
    # The optional objectives' heads (ITC `itc.*`, ITM `itm.*`) may be on one side only: an
    # MDM-pretrained file starts an ITC tuning (its heads are new), an ITC-tuned file starts
    # an MDM-only run (its heads have no use there). Anything else must fit exactly.
    optional = ("itc.", "itm.")
    sd = dict(sd)
    own = model.state_dict()
    unused = sorted(k for k in sd if k.startswith(optional) and k not in own)
    for k in unused:
        del sd[k]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    created = sorted(k for k in missing if k.startswith(optional))
    missing = [k for k in missing if not k.startswith(optional)]
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit the model: missing {missing[:10]}"
                         f"{'...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                         f"{'...' if len(unexpected) > 10 else ''}")
    report = [f"init_from {path}: {len(sd)} tensors loaded (this project's layout)"]
    if created:
        report.append(f"init_from: created {', '.join(created)}: the file has no such heads, "
                      "they start from model.init")
    if unused:
        report.append(f"init_from: ignored {', '.join(unused)}: this run's objectives do not "
                      "use those heads")
    return report
