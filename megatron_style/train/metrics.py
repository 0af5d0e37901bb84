"""What a run reports: TensorBoard scalars, a metrics.jsonl line per logged step, and a progress
bar with ETA on a terminal (plain log lines otherwise). Only rank 0 writes."""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from typing import Optional

import torch

from megatron_style.config import LoggingConfig

# Dense bf16/fp16 tensor-core peak per device, TFLOP/s (vendor data sheets, no sparsity).
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),     # SXM
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("V100", 125.0),
)


def device_peak_tflops(device: torch.device, override: float = 0.0) -> Optional[float]:
    """Peak used for MFU: the config's value when set, else the table entry for this GPU."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS:
        if key in name:
            return peak
    return None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


class MetricsLogger:
    def __init__(self, cfg: LoggingConfig, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.cfg = cfg
        self.total_steps = total_steps
        self.writer = None
        self.jsonl = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(cfg.dir, exist_ok=True)
        # A run resumed at step S after a crash had logged steps after S that it now trains
        # again: TensorBoard drops its events past S (purge_step), and so does metrics.jsonl,
        # so that every step appears once, as the run that continued saw it.
        self.writer = SummaryWriter(cfg.dir, purge_step=start_step + 1 if start_step else None)
        path = os.path.join(cfg.dir, "metrics.jsonl")
        drop_rows_after(path, start_step)
        self.jsonl = open(path, "a", buffering=1)
        use_bar = cfg.progress == "bar" or (cfg.progress == "auto" and sys.stderr.isatty())
        if use_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        """`step` counts completed optimizer steps (1-based)."""
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.jsonl.write(json_line({"step": step, **scalars}) + "\n")
        if self.bar is not None:
            self.bar.set_postfix_str(_short(scalars), refresh=False)
        else:
            eta = scalars.get("time/eta_s")
            eta_txt = f" eta {time.strftime('%H:%M:%S', time.gmtime(eta))}" if eta is not None else ""
            self.info(f"step {step}/{self.total_steps} {_short(scalars)}{eta_txt}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def add_text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.writer.flush()
        self.writer.close()
        self.jsonl.close()


def json_line(row: dict[str, float]) -> str:
    """One JSON object; a non-finite value (a NaN loss) is null, as JSON has no NaN."""
    return json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                       for k, v in row.items()}, allow_nan=False)


def drop_rows_after(path: str, step: int) -> None:
    """Rewrite metrics.jsonl without its rows past `step` (and without a line cut short by a
    crash), durably; nothing to do when there are none."""
    if not os.path.isfile(path):
        return
    keep, changed = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                ok = isinstance(row, dict) and int(row.get("step", 0)) <= step
            except ValueError:
                ok = False
            if ok and line.endswith("\n"):
                keep.append(line)
            else:
                changed = True
    if changed:
        from megatron_style.files import write_text
        write_text(path, "".join(keep))


def _short(s: dict[str, float]) -> str:
    keys = ("loss", "loss/image", "loss/text", "loss/pair_image", "loss/pair_text", "loss/itc",
            "acc/itc_i2t", "loss/itm", "acc/itm", "lr", "throughput/samples_per_s", "perf/mfu")
    names = {"throughput/samples_per_s": "samples/s", "perf/mfu": "mfu"}
    parts = []
    for k in keys:
        if k in s:
            v = s[k]
            parts.append(f"{names.get(k, k)} {v:.3g}" if k != "lr" else f"lr {v:.2e}")
    return " | ".join(parts)
