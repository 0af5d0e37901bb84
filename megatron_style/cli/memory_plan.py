"""`beit3-memory-plan`: the command line over megatron_style.model.memory_plan, which documents it.

With `--config`, each stage of the recipe is planned with its own micro-batch (data.
micro_batch_size split by the stage's stream weights, texts of --text-len tokens) and its own
objectives, and the heaviest stage is named at the end; `--images/--texts/--pairs`,
`--text-len` and `--objective` replace those with one micro-batch for the whole run.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from megatron_style.config import MaskingConfig, load_config, model_config
from megatron_style.config.checks import check_tensor_parallel
from megatron_style.config.objective import model_heads, run_objectives
from megatron_style.model.memory_plan import (GIB, MicroBatch, Objectives, PRECISION_BYTES,
                                              format_plans, local_shapes, plan)
import megatron_style.model.memory_plan as lib

DEFAULT_COUNT, DEFAULT_TEXT_LEN = 16, 64


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beit3-memory-plan", description=lib.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=lib.__doc__.split("\n\n", 1)[1] + "\n" + __doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="model preset: tiny, base, large, giant")
    src.add_argument("--config", help="pretraining recipe (YAML/JSON): model, parallel, "
                     "masking, micro-batch, stages and objectives are taken from it unless "
                     "given here")
    p.add_argument("--tensor", type=int, help="tensor-parallel degree (default 1, or the config's)")
    p.add_argument("--zero", type=int, nargs="+", help="ZeRO stage(s) to compare (default 1, or "
                   "the config's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpus", type=int, help="total GPUs; data-parallel size = gpus / tensor")
    g.add_argument("--dp", type=int, help="data-parallel size (default 1)")
    p.add_argument("--precision", choices=sorted(PRECISION_BYTES), help="default bf16, or the config's")
    p.add_argument("--images", type=int, help=f"image-only samples per micro-batch (default "
                   f"{DEFAULT_COUNT}, or the config's)")
    p.add_argument("--texts", type=int, help="text-only samples per micro-batch")
    p.add_argument("--pairs", type=int, help="image-text pairs per micro-batch")
    p.add_argument("--text-len", type=int, help=f"tokens per text, typical (default "
                   f"{DEFAULT_TEXT_LEN}, at most model.max_text_len)")
    p.add_argument("--objective", nargs="+", metavar="NAME", help="objectives computed: mdm, "
                   "itc, itm (default mdm, or each stage's of the config)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        text = _plan_text(args)
    except ValueError as e:
        print(f"beit3-memory-plan: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


def _plan_text(args: argparse.Namespace) -> str:
    masking = MaskingConfig()
    tensor, zeros, precision, rc = 1, [1], "bf16", None
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
    # Texts are packed at their own length (no padding), so the typical length matters, not
    # the cut-off: 64 unless given (a caption is ~20 tokens, a web-text chunk more).
    text_len = args.text_len or min(DEFAULT_TEXT_LEN, cfg.max_text_len)
    if text_len > cfg.max_text_len:
        raise ValueError(f"--text-len {text_len} exceeds model.max_text_len {cfg.max_text_len}")
    counts = (args.images, args.texts, args.pairs)
    if any(c is not None and c < 0 for c in counts) or text_len < 1:
        raise ValueError("sample counts must be >= 0 and --text-len >= 1")
    check_tensor_parallel(cfg, tensor)

    # (label, micro-batch, objectives) per planned case: each stage of a recipe, or one.
    cases: list[tuple[str, MicroBatch, Objectives]] = []
    if rc is not None and all(c is None for c in counts) and not args.objective:
        from megatron_style.train.stages import StagePlan
        from megatron_style.train.batch_plan import plan_batch
        stages = StagePlan(rc)
        for st in stages.stages:
            stage_cfg = stages.data_config(st)
            n = stage_cfg.data.stream_counts()
            label = f"stage {st.index} '{st.name}' (steps {st.start + 1}-{st.end})" if rc.stages else ""
            pool = (plan_batch(stage_cfg, dp)[0].grad_accum
                    if st.objective.itc_batch == "step" else 1)
            cases.append((label, MicroBatch(n["image"], n["text"], n["pair"], text_len),
                          Objectives.named(st.objective.active(), pool)))
        heads = model_heads(rc)
    else:
        objectives = (Objectives.named(args.objective) if args.objective else
                      Objectives.named(run_objectives(rc)) if rc else
                      Objectives())
        mb = MicroBatch(*(DEFAULT_COUNT if c is None else c for c in counts), text_len)
        cases.append(("", mb, objectives))
        held = set(objectives.heads) | set(model_heads(rc) if rc else ())
        heads = tuple(h for h in ("itc", "itm") if h in held)
    for _, mb, objectives in cases:
        if (objectives.itc or objectives.itm) and mb.pairs == 0:
            raise ValueError(f"objectives {objectives.describe()} need pairs, and the "
                             "micro-batch holds none (give --pairs)")
    shapes = local_shapes(cfg, tensor, heads=heads)
    blocks, peaks = [], []
    for label, mb, objectives in cases:
        plans = [plan(cfg, tensor, z, dp, mb, precision, masking, shapes=shapes,
                      objectives=objectives) for z in zeros]
        text = format_plans(cfg, plans, tensor, dp, mb, precision, shapes, name, objectives)
        blocks.append(f"== {label} ==\n{text}" if label else text)
        best = min(plans, key=lambda q: q.model_states + q.activations_checkpointed)
        peaks.append((best.model_states + best.activations,
                      best.model_states + best.activations_checkpointed, best.zero, label))
    if len(cases) > 1:
        full, ckpt, zero, label = max(peaks, key=lambda t: t[1])
        blocks.append(f"heaviest: {label}: {full / GIB:.2f} GiB, {ckpt / GIB:.2f} GiB with "
                      f"checkpointing (ZeRO-{zero})")
    return "\n\n".join(blocks)


if __name__ == "__main__":
    sys.exit(main())
