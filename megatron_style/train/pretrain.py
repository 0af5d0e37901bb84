"""Entry point: pretrain a Multiway Transformer with masked data modeling.

    deepspeed --num_gpus 8 --module megatron_style.train.pretrain --config configs/pretrain/base.yaml
    torchrun --nproc_per_node 8 -m megatron_style.train.pretrain --config ... key.sub=value
    srun python -m megatron_style.train.pretrain --config ...        (see cluster/pretrain.sh)

The config is read and checked before any process group starts: a bad value exits with
status 2 and `ConfigError: <key>: <what is wrong>` on stderr.
Exit status: 0 done, 1 error, 2 bad config, 3 stopped after repeated non-finite losses,
75 preempted (checkpoint saved; requeue and run the same command to resume).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from megatron_style.config import ConfigError, PretrainConfig, load_config
from megatron_style.train.exit_codes import BAD_CONFIG as EXIT_CONFIG
from megatron_style.train.exit_codes import OK as EXIT_OK


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="beit3-pretrain", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe YAML/JSON, e.g. configs/pretrain/demo.yaml")
    p.add_argument("--resume", help="'auto' (latest complete checkpoint), 'none', or a path; "
                                    "same as checkpoint.resume=...")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("--print-config", action="store_true", help="print the full config and exit")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override any config value, e.g. steps=100 parallel.zero_stage=2")
    return p.parse_args(argv)


def check_paths(cfg: PretrainConfig) -> None:
    """Files the run needs must exist before we start processes that would wait on them."""
    if cfg.checkpoint.init_from and not os.path.exists(cfg.checkpoint.init_from):
        raise ConfigError(f"checkpoint.init_from: {cfg.checkpoint.init_from!r} does not exist")
    if cfg.data.source == "synthetic":
        return  # random token ids and targets: no data and no tokenizer files are read
    from megatron_style.data.loader import check_data_paths
    check_data_paths(cfg)  # shards and tokenizer files


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
        check_paths(cfg)
    except ConfigError as e:
        print(f"ConfigError: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if args.print_config:
        from megatron_style.config import dump_yaml
        print(dump_yaml(cfg))
        return EXIT_OK

    import torch.distributed as dist

    from megatron_style.train.distributed import init_distributed, read_env
    from megatron_style.train.trainer import Trainer

    device = init_distributed(read_env())
    try:
        trainer = Trainer(cfg, device)
        code = trainer.train()
        if code == EXIT_OK and cfg.eval_at_end and cfg.data.source == "demo":
            from megatron_style.train.evaluate import evaluate_trainer
            evaluate_trainer(trainer)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
