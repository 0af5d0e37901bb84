"""`beit3-memory-plan`: the command line over megatron_style.model.memory_plan, which documents it."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from megatron_style.config import MaskingConfig, load_config, model_config
from megatron_style.config.checks import check_tensor_parallel
from megatron_style.model.memory_plan import MicroBatch, PRECISION_BYTES, format_plans, local_shapes, plan
import megatron_style.model.memory_plan as lib


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="beit3-memory-plan", description=lib.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=lib.__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="model preset: tiny, base, large, giant")
    src.add_argument("--config", help="pretraining recipe (YAML/JSON): model, parallel and "
                     "masking settings are taken from it unless given here")
    p.add_argument("--tensor", type=int, help="tensor-parallel degree (default 1, or the config's)")
    p.add_argument("--zero", type=int, nargs="+", help="ZeRO stage(s) to compare (default 1, or "
                   "the config's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpus", type=int, help="total GPUs; data-parallel size = gpus / tensor")
    g.add_argument("--dp", type=int, help="data-parallel size (default 1)")
    p.add_argument("--precision", choices=sorted(PRECISION_BYTES), help="default bf16, or the config's")
    p.add_argument("--images", type=int, default=16, help="image-only samples per micro-batch")
    p.add_argument("--texts", type=int, default=16, help="text-only samples per micro-batch")
    p.add_argument("--pairs", type=int, default=16, help="image-text pairs per micro-batch")
    p.add_argument("--text-len", type=int, default=64, help="tokens per text (default 64)")
    args = p.parse_args(argv)
    try:
        masking = MaskingConfig()
        tensor, zeros, precision = 1, [1], "bf16"
        if args.config:
            rc = load_config(args.config)
            cfg, masking = rc.model, rc.data.masking
            tensor, zeros, precision = rc.parallel.tensor, [rc.parallel.zero_stage], rc.parallel.precision
            name = args.config
        else:
            cfg, name = model_config(args.preset), args.preset
        tensor = args.tensor or tensor
        zeros = args.zero or zeros
        precision = args.precision or precision
        if args.gpus is not None:
            if args.gpus % tensor:
                raise ValueError(f"--gpus {args.gpus} is not a multiple of --tensor {tensor}")
            dp = args.gpus // tensor
        else:
            dp = args.dp or 1
        if args.text_len > cfg.max_text_len:
            raise ValueError(f"--text-len {args.text_len} exceeds model.max_text_len {cfg.max_text_len}")
        if min(args.images, args.texts, args.pairs) < 0 or args.text_len < 1:
            raise ValueError("sample counts must be >= 0 and --text-len >= 1")
        check_tensor_parallel(cfg, tensor)
        mb = MicroBatch(args.images, args.texts, args.pairs, args.text_len)
        shapes = local_shapes(cfg, tensor)
        plans = [plan(cfg, tensor, z, dp, mb, precision, masking, shapes=shapes) for z in zeros]
    except ValueError as e:
        print(f"beit3-memory-plan: error: {e}", file=sys.stderr)
        return 2
    print(format_plans(cfg, plans, tensor, dp, mb, precision, shapes, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
