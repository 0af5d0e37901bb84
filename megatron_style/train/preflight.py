"""What the entry point checks after the config and before any process group starts: the
files a run names exist and fit, and its checkpoint.dir belongs to it. A failure here is a
ConfigError (exit 2) on every rank, before one of them waits on another."""
from __future__ import annotations

import os

from megatron_style.checkpoint.directory import check_one_run
from megatron_style.config import ConfigError, PretrainConfig
from megatron_style.data.shards import check_data_paths
from megatron_style.train.batch_plan import data_parallel_ranks, plan_batch
from megatron_style.train.distributed import read_env


def preflight(cfg: PretrainConfig) -> None:
    # A global batch that does not divide over the ranks this launch starts: said here, on
    # every rank, before one of them waits on another.
    if cfg.data.global_batch_size:
        plan_batch(cfg, data_parallel_ranks(cfg, read_env().world_size))
    ck = cfg.checkpoint
    if ck.init_from and not os.path.exists(ck.init_from):
        raise ConfigError(f"checkpoint.init_from: {ck.init_from!r} does not exist")
    try:
        check_one_run(ck.resume, ck.dir, ck.init_from)
    except ValueError as e:
        raise ConfigError(f"checkpoint.dir: {e}") from None
    if cfg.data.source == "synthetic":
        return  # random token ids and targets: no data and no tokenizer files are read
    check_data_paths(cfg)  # shards and tokenizer files
    check_eval_paths(cfg)
    tok = cfg.data.tokenizer
    if tok.visual == "kmeans" and cfg.data.source == "shards" and not tok.visual_model:
        raise ConfigError("data.tokenizer.visual_model: visual: kmeans with data.source shards "
                          "needs a trained k-means tokenizer (beit3-train-tokenizer kmeans), or "
                          "use visual: vqkd with BEiT v2's checkpoint")


def check_eval_paths(cfg: PretrainConfig) -> None:
    """Periodic validation on shards: every eval.<stream>_shards given must name shards (a
    typo must not turn validation off for a run of weeks), and at least one must be given."""
    if not cfg.eval.every_steps or cfg.data.source != "shards":
        return
    from megatron_style.data.shards import resolve_shards
    from megatron_style.train.validation import validated_streams
    given = [s for s in ("image", "text", "pair") if getattr(cfg.eval, f"{s}_shards").strip()]
    if not given:
        raise ConfigError("eval.every_steps: validation on data.source shards needs held-out "
                          "shards: set eval.image_shards, eval.text_shards and/or "
                          "eval.pair_shards, or eval.every_steps: 0")
    for s in given:
        resolve_shards(getattr(cfg.eval, f"{s}_shards"), f"eval.{s}_shards",
                       cfg.data.max_missing_shards_fraction)
    if not validated_streams(cfg):
        raise ConfigError(f"eval.every_steps: the eval shards given ({', '.join(given)}) are of "
                          "streams this run never trains on")
