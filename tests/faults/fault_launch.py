"""Running the trainer as users do, in the background, to hurt it while it runs: find its
ranks and their loader workers, wait for a step, and check what it left on disk."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import psutil

from tests.train.launch import ROOT, TINY, free_port

# TINY on the demo data: real loader workers (processes), tokenizers cached after first use.
DEMO_TINY = ["model.preset=tiny", "data.source=demo", "data.micro_batch_size=6",
             "data.num_workers=1", "data.masking.image_min_block=2", "parallel.precision=fp32",
             "optim.warmup_steps=2", "logging.every_steps=1", "logging.progress=lines",
             "eval_at_end=false"]

__all__ = ["DEMO_TINY", "TINY", "Run", "checkpoint_dirs", "complete_and_whole", "wait_for"]


class Run:
    """The trainer in the background; its combined output goes to a file. Whatever is still
    running when a test ends is killed (tests/faults/conftest.py calls `kill_all`)."""

    started: list["Run"] = []

    @classmethod
    def kill_all(cls) -> None:
        while cls.started:
            run = cls.started.pop()
            if run.proc.poll() is None:
                run.kill()

    def __init__(self, args: list[str], tmp: Path, ranks: int = 1, env: Optional[dict] = None,
                 name: str = "log") -> None:
        if ranks == 1:
            cmd = [sys.executable, "-m", "megatron_style.train.pretrain", *args]
        else:
            cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
                   "--module", "megatron_style.train.pretrain", *args]
        self.log_path = tmp / f"{name}.txt"
        self._log = open(self.log_path, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     start_new_session=True)
        Run.started.append(self)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """The exit status; kills everything and fails the test when it takes longer."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout:.0f} s:\n{self.output[-6000:]}")
        self.elapsed = time.monotonic() - self.t0
        self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL to everything it started: its process group (a new session), which outlives
        the top process, and any descendant that left the group."""
        for p in self.tree():
            try:
                p.send_signal(signal.SIGCONT)  # a frozen process could not die
                p.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait(timeout=30)

    def tree(self) -> list[psutil.Process]:
        try:
            top = psutil.Process(self.proc.pid)
            return [top, *top.children(recursive=True)]
        except psutil.Error:
            return []

    def trainers(self) -> dict[int, psutil.Process]:
        """Rank -> its trainer process: one running megatron_style.train.pretrain whose
        parent does not (its loader workers run the same command line)."""
        out = {}
        for p in self.tree():
            try:
                if not _is_trainer(p) or _is_trainer(p.parent()):
                    continue
                out[int(p.environ().get("RANK", 0))] = p
            except psutil.Error:
                continue
        return out

    def workers(self, rank: int) -> list[psutil.Process]:
        """The data-loader worker processes of `rank`."""
        trainer = self.trainers().get(rank)
        if trainer is None:
            return []
        try:
            return [c for c in trainer.children(recursive=True) if c.is_running()]
        except psutil.Error:
            return []

    def wait_for_line(self, text: str, timeout: float) -> None:
        wait_for(lambda: text in self.output, timeout,
                 lambda: f"no {text!r} in the output:\n{self.output[-4000:]}")


def _is_trainer(p: Optional[psutil.Process]) -> bool:
    """`python [-u] -m megatron_style.train.pretrain ...` (the launchers name the module in
    their own command lines too, after --module)."""
    try:
        cmd = p.cmdline() if p is not None else []
    except psutil.Error:
        return False
    return any(a == "-m" and b == "megatron_style.train.pretrain" for a, b in zip(cmd, cmd[1:]))


def wait_for(condition: Callable[[], bool], timeout: float,
             what: Callable[[], str] = lambda: "condition") -> None:
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s: {what()}")
        time.sleep(0.2)


def checkpoint_dirs(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.iterdir() if p.name.startswith("step_")) if ckpt.is_dir() else []


def complete_and_whole(tag_dir: Path) -> bool:
    """A checkpoint marked COMPLETE whose every file has the size its manifest says."""
    m = json.loads((tag_dir / "COMPLETE").read_text())
    return bool(m["files"]) and all(
        (tag_dir / n).is_file() and (tag_dir / n).stat().st_size == size
        for n, size in m["files"].items())
