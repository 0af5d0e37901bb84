"""A stand-in for `python -m megatron_style.train.pretrain` with the same outside contract.

It lets the Slurm and launcher tests exercise cluster/pretrain.sh and cluster/launch_deepspeed.sh
(rendezvous, preemption, requeue, resume, config errors, failing ranks) in seconds, and keeps
them runnable while the real trainer is built or broken:

- SIGUSR1/SIGTERM handlers are installed first thing, before the config is read or torch is
  imported: a signal during start-up is kept, not fatal;
- `--config FILE key.sub=value ...` (and deepspeed's `--local_rank=N`), checked by the
  project's own `load_config`; a bad key or value prints `ConfigError: <key>: <message>` on
  stderr and exits 2 before any process group;
- rank/world from RANK/WORLD_SIZE/LOCAL_RANK, else SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID;
  MASTER_ADDR/MASTER_PORT from the environment; gloo;
- a stop request is looked at before the first step and at the end of every step; the ranks
  agree (all-reduce) and stop at the same step: with checkpoint.save=true (the default) rank 0
  saves a checkpoint and every rank exits 75 (PREEMPTED); with checkpoint.save=false nothing is
  written and every rank exits 4 (STOPPED);
- `checkpoint.resume=auto` continues from the latest complete checkpoint in checkpoint.dir;
- rank 0 prints its argv as JSON (`argv: [...]`), appends {"step", "loss"} lines to
  <logging.dir>/metrics.jsonl and writes TensorBoard events there; every rank prints
  `rank R/W step N loss L` lines.

Faults for the tests, from the environment (each rank reads the same variables):
  STANDIN_STEP_SECONDS   pace of a step (default 0.2) so that a test can signal mid-run
  STANDIN_START_SECONDS  extra start-up time before the process group (default 0)
  STANDIN_EXIT=R:S@N,..  rank R exits with status S at the end of step N, at once (os._exit:
                         no agreement, no cleanup), as a rank that fails on its own would
  STANDIN_HANG=R@N,..    rank R stops at the end of step N and never comes back, as a rank
                         stuck in a collective whose peer died (NCCL waits for its timeout):
                         signals are recorded but do not end it; only SIGKILL does
"""
from __future__ import annotations

import signal
import time

# First: a stop request that arrives while the rest starts up is kept.
STOP = {"signal": None}


def _on_signal(signum, _frame):
    if STOP["signal"] is None:
        STOP["signal"] = signal.Signals(signum).name


signal.signal(signal.SIGUSR1, _on_signal)
signal.signal(signal.SIGTERM, _on_signal)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from megatron_style.config import ConfigError, load_config  # noqa: E402

PREEMPTED = 75
STOPPED = 4


def say(text: str) -> None:
    """One write per line: the ranks share the deepspeed launcher's stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def rank_world() -> tuple[int, int, int]:
    if "RANK" in os.environ:
        env = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    else:
        env = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    return tuple(int(os.environ.get(k, d)) for k, d in zip(env, ("0", "1", "0")))


def faults(name: str, rank: int) -> dict[int, int]:
    """{step: status} of this rank from STANDIN_EXIT ("R:S@N,..") or STANDIN_HANG ("R@N,..")."""
    out = {}
    for item in filter(None, os.environ.get(name, "").split(",")):
        who, at = item.split("@")
        r, _, status = who.partition(":")
        if int(r) == rank:
            out[int(at)] = int(status or 0)
    return out


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
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher's
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"ConfigError: {e}", file=sys.stderr)
        return 2

    rank, world, local = rank_world()
    exits, hangs = faults("STANDIN_EXIT", rank), faults("STANDIN_HANG", rank)
    if rank == 0:
        say("argv: " + json.dumps(argv))
    time.sleep(float(os.environ.get("STANDIN_START_SECONDS", "0")))

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    say(f"rank {rank}/{world} local {local} on {os.uname().nodename} "
        f"master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")

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
        say(f"rank {rank}: resumed from {path} at step {step}")

    writer = None
    if rank == 0:
        os.makedirs(cfg.logging.dir, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(cfg.logging.dir)
    pace = float(os.environ.get("STANDIN_STEP_SECONDS", "0.2"))

    def agree_to_stop() -> bool:
        # All ranks must stop at the same step: agree on "anyone was signalled".
        flag = torch.tensor([1 if STOP["signal"] else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop_here() -> int:
        saved = cfg.checkpoint.save
        if rank == 0 and saved:
            save_checkpoint(cfg.checkpoint.dir, step, {"w": w, "step": step})
        dist.barrier()
        code = PREEMPTED if saved else STOPPED
        what = f"checkpoint at step {step}" if saved else f"no checkpoint (checkpoint.save=false) at step {step}"
        say(f"rank {rank}: {STOP['signal'] or 'peer signal'} -> {what}, exit {code}")
        if writer:
            writer.close()
        dist.destroy_process_group()
        return code

    if agree_to_stop():  # asked to stop while starting: before any step
        return stop_here()
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
            say(f"rank {rank}/{world} step {step} loss {loss:.6f}")
            if rank == 0:
                with open(os.path.join(cfg.logging.dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss}) + "\n")
                writer.add_scalar("train/loss", loss, step)
                writer.flush()
        if step in exits:
            say(f"rank {rank}: injected exit {exits[step]} at step {step}")
            os._exit(exits[step])
        if step in hangs:
            say(f"rank {rank}: injected hang at step {step}")
            while True:
                time.sleep(0.2)
        stopping = agree_to_stop() and step < cfg.steps
        if rank == 0 and cfg.checkpoint.save and not stopping and (
                step % cfg.checkpoint.every_steps == 0 or step == cfg.steps):
            save_checkpoint(cfg.checkpoint.dir, step, {"w": w, "step": step})
        if stopping:
            return stop_here()
        dist.barrier()

    say(f"rank {rank}: finished at step {step}")
    if writer:
        writer.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
