"""Entry point: pretrain a Multiway Transformer with masked data modeling.

    deepspeed --num_gpus 8 --module megatron_style.train.pretrain --config configs/pretrain/base.yaml
    torchrun --nproc_per_node 8 -m megatron_style.train.pretrain --config ... key.sub=value
    srun python -m megatron_style.train.pretrain --config ...        (see cluster/pretrain.sh)

The config is read and checked before any process group starts: a bad value exits with
status 2 and `ConfigError: <key>: <what is wrong>` on stderr.
Exit status (the same on every rank; train/exit_codes.py): 0 done, 1 error, 2 bad config,
3 stopped after repeated non-finite losses, 4 stopped on a signal without a checkpoint,
75 preempted (checkpoint written; run the same command to resume), 124 stalled (watchdog).

Failures are loud and fast: a rank that fails prints its traceback (with its rank) and exits
at once, without waiting for the others in a collective; the others then fail in their next
collective, or the launcher ends them (deepspeed, torchrun and srun --kill-on-bad-exit do).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Optional

from megatron_style.config import ConfigError, PretrainConfig, load_config
from megatron_style.train import exit_codes
from megatron_style.train.signals import StopRequest


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


def main(argv: Optional[list[str]] = None) -> int:
    stop = StopRequest().install()  # first: a signal during start-up is kept, not fatal
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:  # the recipe as it stands; its files need not exist here
            from megatron_style.config import dump_yaml
            print(dump_yaml(cfg))
            return exit_codes.OK
        # Imported after the signal handlers: torch and webdataset take a second to import,
        # and a stop signal in that second must be kept, not fatal.
        from megatron_style.train.preflight import preflight
        preflight(cfg)
    except ConfigError as e:
        print(f"ConfigError: {e}", file=sys.stderr, flush=True)
        return exit_codes.BAD_CONFIG
    return run(cfg, stop)


def run(cfg: PretrainConfig, stop: StopRequest) -> int:
    from megatron_style.train.distributed import read_env
    from megatron_style.train.watchdog import Watchdog

    env = read_env()
    watchdog = Watchdog(cfg.guards.stall_timeout_s, env.rank).start()
    try:
        import torch.distributed as dist

        from megatron_style.train.distributed import init_distributed
        from megatron_style.train.trainer import Trainer

        device = init_distributed(env)
        watchdog.beat("building the model and engine")
        trainer = Trainer(cfg, device, stop, watchdog)
        code = trainer.train()
        if code == exit_codes.OK and cfg.eval_at_end and cfg.data.source == "demo":
            from megatron_style.train.evaluate import evaluate_trainer
            watchdog.beat("evaluation")
            evaluate_trainer(trainer)
        watchdog.beat("shutting down")
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt and SystemExit too
        fail(env.rank, e)
    watchdog.stop()
    # Everything the run writes is closed and durable by now, so the interpreter's teardown is
    # skipped: a C++ destructor at exit (communication backend or loader threads) once aborted
    # a finished 2-rank run with std::terminate (exit -6), which the launcher and Slurm then
    # report as a failed job.
    _exit(code)
    return code  # not reached


def fail(rank: int, e: BaseException) -> None:
    """End this rank now: its traceback, then os._exit. No barrier, no process-group teardown
    and no interpreter cleanup: each could wait forever on a peer that is gone, or on this
    rank's own stuck loader workers (they notice their parent is gone and exit).

    Nothing may stop the `rank N: FAILED` line: Python runs signal handlers between any two
    bytecodes, and torch's DataLoader SIGCHLD handler raises again each time another child
    exits while a dead worker is still registered (a loader shutting its workers down as the
    exception unwinds). Such a second exception inside this report once ended a rank with
    status 1 and no FAILED line, so the handler goes first and anything else raised here still
    ends in the line and the exit status."""
    _quiet_child_signals()
    code, line = exit_codes.FAILED, f"rank {rank}: FAILED: {type(e).__name__}"
    try:
        if isinstance(e, ConfigError):  # a check that can only run once the processes exist
            code, line = exit_codes.BAD_CONFIG, f"ConfigError: {e}"
        else:
            sys.stderr.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
            line = f"rank {rank}: FAILED: {type(e).__name__}: {str(e).rstrip()}{_hint(e)}"
    except BaseException:  # noqa: BLE001 - the report is best-effort, the line is not
        pass
    try:
        print(line, file=sys.stderr, flush=True)
    finally:
        _exit(code)


def _quiet_child_signals() -> None:
    import signal

    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except (ValueError, OSError, AttributeError):  # not the main thread, or no SIGCHLD
        pass


def _hint(e: BaseException) -> str:
    """What the failure most likely was, for the one-line summary."""
    files = [f.filename.replace(os.sep, "/") for f in traceback.extract_tb(e.__traceback__)]
    if any("/torch/utils/data/" in f or "/multiprocessing/" in f for f in files) or \
            "DataLoader worker" in str(e):
        return (" (the data loader failed on this rank: a worker process died or raised, see "
                "'DataLoader worker' above; a worker killed by signal 9 is often the "
                "kernel's out-of-memory killer)")
    if _is_collective_failure(e):
        return " (a collective failed: another rank probably failed first; see its message)"
    return ""


def _is_collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistError", None),) if k is not None)
    text = str(e)
    return (bool(kinds) and isinstance(e, kinds)) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer",
                            "Broken pipe", "NCCL", "gloo"))


def _exit(code: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
