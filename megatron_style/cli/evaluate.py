"""`beit3-evaluate`: the command line over megatron_style.train.evaluate, which documents it."""
from __future__ import annotations

import argparse
import sys
from typing import Optional
import os

import torch

from megatron_style.batch import PackedBatch
from megatron_style.train.evaluate import caption_gap, format_result
import megatron_style.train.evaluate as lib


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="beit3-evaluate", description=lib.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint.dir of a demo run, or one step directory")
    p.add_argument("--samples", type=int, default=256, help="held-out pairs")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)

    from megatron_style.data.build_tokenizers import build_text_tokenizer
    from megatron_style.data.build_tokenizers import build_visual_tokenizer
    from megatron_style.model.pretraining import MaskedDataModel
    from megatron_style.checkpoint.directory import resolve
    from megatron_style.checkpoint.fp32 import checkpoint_pretrain_config
    from megatron_style.checkpoint.model_files import load_model_file

    cfg = checkpoint_pretrain_config(os.path.join(*resolve(args.checkpoint)))
    if cfg.data.source != "demo":
        print("error: the caption evaluation uses the demo generator; this run trained on "
              f"data.source={cfg.data.source!r}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = MaskedDataModel(cfg.model)
    load_model_file(model, args.checkpoint)
    model.to(device).eval()
    visual = build_visual_tokenizer(cfg).to(device).eval()

    def prepare(b: PackedBatch) -> PackedBatch:
        b = b.to(device)
        if b.image_targets_pending:
            b = b.with_image_targets(visual(b.images, b.tokenizer_images))
        return b

    result = caption_gap(lambda b: model(b).stats, cfg, build_text_tokenizer(cfg), prepare,
                         args.samples, args.seed)
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
