"""Helpers to run the trainer as users do: `python -m ...` or the deepspeed launcher, in a
subprocess, and read what it wrote."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The smallest useful run: tiny model, synthetic data, fp32, a log line per step.
TINY = ["model.preset=tiny", "data.source=synthetic", "data.micro_batch_size=6",
        "data.synthetic_text_len=12", "parallel.precision=fp32", "optim.warmup_steps=2",
        "logging.every_steps=1", "logging.progress=lines", "eval_at_end=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_dirs(tmp_path, name: str = "run") -> list[str]:
    return [f"checkpoint.dir={tmp_path / name / 'ckpt'}", f"logging.dir={tmp_path / name / 'tb'}"]


def pretrain(args: list[str], ranks: int = 1, env: Optional[dict] = None, timeout: int = 300,
             config: Optional[str] = None, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """Several ranks start under torchrun unless `launcher="deepspeed"`: the trainer reads the
    same environment from both, and torchrun starts in about 5 s less (the deepspeed command
    imports DeepSpeed twice before any rank starts), which over the suite's launches is
    minutes. The README's deepspeed command is run as it is by the demo test, the fault tests
    (tests/faults/fault_launch.py, the non-finite matrix) and tests/cluster."""
    cfg = ["--config", config] if config else []
    if ranks == 1:
        cmd = [sys.executable, "-m", "megatron_style.train.pretrain", *cfg, *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", "-m", "megatron_style.train.pretrain", *cfg, *args]
    elif launcher == "deepspeed":
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
               "--module", "megatron_style.train.pretrain", *cfg, *args]
    else:
        raise ValueError(f"launcher {launcher!r}: 'torchrun' or 'deepspeed'")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def metrics(tmp_path, name: str = "run") -> list[dict]:
    path = tmp_path / name / "tb" / "metrics.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f]


def explain(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout ---\n{p.stdout[-4000:]}\n--- stderr ---\n{p.stderr[-4000:]}"
