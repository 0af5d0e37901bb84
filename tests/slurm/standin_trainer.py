"""A stand-in for `python -m megatron_style.train.pretrain` with the same outside contract.

It lets the Slurm tests exercise cluster/pretrain.sh (rendezvous, preemption, requeue, resume,
config errors) in seconds, and keeps them runnable while the real trainer is built or broken:

- `--config FILE key.sub=value ...`, checked by the project's own `load_config`; a bad key or
  value prints `ConfigError: <key>: <message>` on stderr and exits 2 before any process group;
- rank/world from RANK/WORLD_SIZE/LOCAL_RANK, else SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID;
  MASTER_ADDR/MASTER_PORT from the environment; gloo;
- SIGUSR1/SIGTERM set a flag; at the end of the step the ranks agree (all-reduce), a
  checkpoint is saved and every rank exits 75;
- `checkpoint.resume=auto` continues from the latest complete checkpoint in checkpoint.dir;
- rank 0 appends {"step", "loss"} lines to <logging.dir>/metrics.jsonl and writes TensorBoard
  events there; every rank prints `rank R/W step N loss L` lines.
STANDIN_STEP_SECONDS (default 0.2) paces the steps so that a test can signal mid-run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from megatron_style.config import ConfigError, load_config

PREEMPTED = 75


def rank_world() -> tuple[int, int, int]:
    if "RANK" in os.environ:
        env = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    else:
        env = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    return tuple(int(os.environ.get(k, d)) for k, d in zip(env, ("0", "1", "0")))


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The newest step_* directory that has its `complete` marker (written last)."""
    if not os.path.isdir(ckpt_dir):
        return None
    done = [d for d in os.listdir(ckpt_dir)
            if d.startswith("step_") and os.path.exists(os.path.join(ckpt_dir, d, "complete"))]
    return os.path.join(ckpt_dir, max(done)) if done else None


def save_checkpoint(ckpt_dir: str, step: int, state: dict) -> None:
    import torch

    path = os.path.join(ckpt_dir, f"step_{step:08d}")
    os.makedirs(path, exist_ok=True)
    torch.save(state, os.path.join(path, "state.pt"))
    with open(os.path.join(path, "complete"), "w") as f:
        f.write(f"{step}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"ConfigError: {e}", file=sys.stderr)
        return 2

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    import torch
    import torch.distributed as dist

    rank, world, local = rank_world()
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    print(f"rank {rank}/{world} local {local} on {os.uname().nodename} "
          f"master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)

    # Linear regression towards a fixed target: the loss falls, steps are reproducible.
    w = torch.zeros(8)
    target = torch.linspace(-1, 1, 8)
    step = 0
    resume = cfg.checkpoint.resume
    path = latest_checkpoint(cfg.checkpoint.dir) if resume == "auto" else (
        None if resume == "none" else resume)
    if path:
        state = torch.load(os.path.join(path, "state.pt"))
        w, step = state["w"], state["step"]
        print(f"rank {rank}: resumed from {path} at step {step}", flush=True)

    writer = None
    if rank == 0:
        os.makedirs(cfg.logging.dir, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(cfg.logging.dir)
    pace = float(os.environ.get("STANDIN_STEP_SECONDS", "0.2"))

    while step < cfg.steps:
        step += 1
        g = torch.Generator().manual_seed(step * 1000 + rank)
        x = torch.randn(16, 8, generator=g)
        y = x @ target
        loss = ((x @ w - y) ** 2).mean()
        grad = 2 * x.T @ (x @ w - y) / len(x)
        dist.all_reduce(grad)
        dist.all_reduce(loss)
        w -= 0.05 * grad / world
        loss = loss.item() / world
        time.sleep(pace)
        if step % cfg.logging.every_steps == 0:
            print(f"rank {rank}/{world} step {step} loss {loss:.6f}", flush=True)
            if rank == 0:
                with open(os.path.join(cfg.logging.dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss}) + "\n")
                writer.add_scalar("train/loss", loss, step)
                writer.flush()
        # All ranks must stop at the same step: agree on "anyone was signalled".
        flag = torch.tensor([1 if stop["signal"] else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        preempted = bool(flag.item()) and step < cfg.steps
        if rank == 0 and (preempted or step % cfg.checkpoint.every_steps == 0 or step == cfg.steps):
            save_checkpoint(cfg.checkpoint.dir, step, {"w": w, "step": step})
        dist.barrier()
        if preempted:
            print(f"rank {rank}: {stop['signal'] or 'peer signal'} -> checkpoint at step {step}, "
                  f"exit {PREEMPTED}", flush=True)
            if writer:
                writer.close()
            dist.destroy_process_group()
            return PREEMPTED

    print(f"rank {rank}: finished at step {step}", flush=True)
    if writer:
        writer.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
