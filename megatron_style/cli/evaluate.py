"""`beit3-evaluate`: the command line over megatron_style.train.evaluate, which documents it.

    beit3-evaluate CHECKPOINT [--samples N] [--seed S]
        the demo's masked caption-word accuracy, true image vs swapped image
    beit3-evaluate retrieval CHECKPOINT [--samples N] [--seed S] [--pair-shards PATTERN]
                             [--batch-size B] [--json PATH] [--config RECIPE]
        zero-shot image<->text retrieval R@1/5/10 with the ITC heads
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from megatron_style.batch import PackedBatch
from megatron_style.train.evaluate import caption_gap, format_result
import megatron_style.train.evaluate as lib

RETRIEVAL_HELP = """Zero-shot retrieval: each held-out image ranked against every held-out text
and each text against every image, through the ITC heads (vision_head, language_head) of a
model trained or tuned with objective.itc; Recall@1/5/10 both ways, in percent.

CHECKPOINT: a run's checkpoint.dir (its newest complete checkpoint) or one step directory,
our exported model file (beit3-export, any layout; ours records its config), or a released
BEiT-3 retrieval / *_itc_* file (give --config with the recipe that describes the model and
its tokenizer, e.g. the base preset, model.attention=decoupled, data.tokenizer.text_model).

Held-out pairs: the demo's (the same scenes as the caption evaluation for the same --seed),
or the first --samples readable pairs of --pair-shards (data.pair.shards' syntax: a brace
pattern, a directory, a listing), images whole (no crop, flip or jitter), texts whole; bad
samples are skipped and counted.

    beit3-evaluate retrieval runs/demo_itc/checkpoints
    beit3-evaluate retrieval beit3_base_itc_patch16_224.pth --config base_itc.yaml \\
        --pair-shards '/data/coco_val/{00000..00004}.tar' --samples 5000 --json r.json
"""


class EvaluateError(ValueError):
    """What the user must change; printed as `error: ...`, exit status 2."""


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A subcommand without breaking `beit3-evaluate CHECKPOINT`: only "retrieval" as the first
    # word selects it (a checkpoint folder of that name is still reachable as ./retrieval).
    if argv and argv[0] == "retrieval":
        return retrieval_main(argv[1:])
    return caption_main(argv)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def caption_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="beit3-evaluate", description=lib.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="zero-shot retrieval: beit3-evaluate retrieval --help")
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
    from megatron_style.config.objective import model_heads

    cfg = checkpoint_pretrain_config(os.path.join(*resolve(args.checkpoint)))
    if cfg.data.source != "demo":
        print("error: the caption evaluation uses the demo generator; this run trained on "
              f"data.source={cfg.data.source!r}", file=sys.stderr)
        return 2
    device = _device()
    # The run's heads: a checkpoint of a run with objective.itc / itm holds them, and loading
    # is strict about every tensor.
    model = MaskedDataModel(cfg.model, heads=model_heads(cfg))
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


# ---- retrieval ------------------------------------------------------------------------------
def retrieval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="beit3-evaluate retrieval", description=RETRIEVAL_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory, exported or released model file")
    p.add_argument("--samples", type=int, default=256, help="held-out pairs (default 256)")
    p.add_argument("--seed", type=int, default=1234,
                   help="which demo pairs (no effect with --pair-shards: nothing is random)")
    p.add_argument("--pair-shards", default="", metavar="PATTERN",
                   help="held-out image-text pair shards instead of the demo's pairs")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass")
    p.add_argument("--json", default="", metavar="PATH", help="also write the numbers here")
    p.add_argument("--config", default="", metavar="RECIPE",
                   help="recipe YAML of the model, for a file that records none (released files)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the --config recipe (repeatable)")
    args = p.parse_args(argv)
    if args.samples < 1 or args.batch_size < 1:
        p.error(f"--samples and --batch-size must be >= 1, got {args.samples} and {args.batch_size}")

    from megatron_style.config import ConfigError
    from megatron_style.files import UnsafeFileError
    try:
        result = evaluate_retrieval(args)
    except (EvaluateError, ValueError, ConfigError, UnsafeFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megatron_style.train.retrieval_eval import format_retrieval
    print(format_retrieval(result))
    if args.json:
        from megatron_style.files import write_json
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, result)
    return 0


def evaluate_retrieval(args: argparse.Namespace) -> dict:
    """The recall numbers (model/retrieval.py retrieval_recall) plus where they come from."""
    from megatron_style.data.build_tokenizers import build_text_tokenizer
    from megatron_style.model.retrieval import retrieval_recall
    from megatron_style.train.retrieval_eval import pair_features, unmasked_pairs

    model, cfg = load_retrieval_model(args.checkpoint, args.config, args.override)
    device = _device()
    model.to(device).eval()
    tok = build_text_tokenizer(cfg)
    if args.pair_shards:
        from megatron_style.train.validation import held_out_stream
        samples, skipped = held_out_stream(cfg, tok, "pair", args.samples, args.seed,
                                           shards=args.pair_shards, key="--pair-shards")
        if not samples:
            raise EvaluateError(f"--pair-shards {args.pair_shards!r}: no readable image-text "
                                f"pair (skipped: {skipped or 'none found'})")
        if skipped:
            print(f"skipped bad samples: {skipped}", file=sys.stderr)
        source = args.pair_shards
    else:
        if cfg.data.source != "demo":
            raise EvaluateError("the demo's held-out pairs fit only models trained on the demo "
                                f"(this one: data.source={cfg.data.source!r}); give "
                                "--pair-shards PATTERN with held-out image-text pairs")
        from megatron_style.data.demo import caption_eval_samples
        # The pairs of train/evaluate.demo_retrieval (the same scenes for the same seed), with
        # this command's batch size.
        samples, _ = caption_eval_samples(cfg, tok, args.samples, args.seed)
        source = f"demo (seed {args.seed})"

    def prepare(b: PackedBatch) -> PackedBatch:
        return b.to(device)  # whole images: no hidden patch, so no visual targets to fill

    with torch.no_grad():
        feats = pair_features(model, unmasked_pairs(samples), cfg, prepare,
                              batch_size=args.batch_size)
        result = retrieval_recall(*feats)
    return {"checkpoint": args.checkpoint, "pairs": source, **result}


def _no_itc(path: str) -> EvaluateError:
    return EvaluateError(
        f"{path} has no ITC heads (vision_head, language_head, logit_scale): the model was "
        "trained without objective.itc, and retrieval ranks with those heads. Train or tune it "
        "with objective.itc > 0 (e.g. objective.itc=1, or BEiT-3's ITC tuning: objective.mdm=0 "
        "objective.itc=1), or evaluate a released *_itc_* / retrieval-layout file")


def load_retrieval_model(path: str, config: str = "", overrides: Optional[list[str]] = None):
    """(MaskedDataModel with ITC heads, loaded; its PretrainConfig) from a checkpoint
    directory, our model file or a released one. EvaluateError without ITC heads or config."""
    from megatron_style.checkpoint.model_files import load_model_file
    from megatron_style.config import load_config
    from megatron_style.config.objective import model_heads
    from megatron_style.model.pretraining import MaskedDataModel

    explicit = load_config(config, list(overrides or [])) if config else None
    if os.path.isdir(path):
        from megatron_style.checkpoint.directory import resolve
        from megatron_style.checkpoint.fp32 import checkpoint_pretrain_config
        recorded = checkpoint_pretrain_config(os.path.join(*resolve(path)))
        cfg = explicit or recorded
        # The checkpoint holds the heads its run's objectives needed (model_heads).
        heads = model_heads(recorded if recorded is not None else cfg) if cfg is not None else ()
    elif os.path.isfile(path):
        recorded, keys = _file_config_and_keys(path)
        cfg = explicit or recorded
        # A file's own tensors say which heads it has (a released file: ITC keys unprefixed).
        heads = tuple(h for h, has in (
            ("itc", any(k in keys for k in ("itc.logit_scale", "logit_scale"))),
            ("itm", any(k.startswith("itm.") for k in keys))) if has)
    else:
        raise EvaluateError(f"{path}: no such checkpoint directory or model file")
    if cfg is None:
        raise EvaluateError(f"{path} records no config: give --config RECIPE (the recipe of the "
                            "model: preset or sizes, model.attention, data.tokenizer.text_model)")
    if "itc" not in heads:
        raise _no_itc(path)
    model = MaskedDataModel(cfg.model, heads=heads)
    load_model_file(model, path)
    return model, cfg


def _file_config_and_keys(path: str):
    """(the PretrainConfig a model file records, or None; its state dict's keys), read
    memory-mapped: no tensor is loaded to look."""
    import yaml

    from megatron_style.config import from_dict
    from megatron_style.files import load_untrusted
    raw = load_untrusted(path, "model file", mmap=True)
    sd = raw.get("model", raw.get("module", raw)) if isinstance(raw, dict) else raw
    keys = set(sd) if isinstance(sd, dict) else set()
    text = raw.get("config") if isinstance(raw, dict) else None
    cfg = None
    if isinstance(text, str) and text:
        from megatron_style.config import PretrainConfig
        cfg = from_dict(PretrainConfig, yaml.safe_load(text))
    return cfg, keys


if __name__ == "__main__":
    sys.exit(main())
