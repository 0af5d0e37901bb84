"""Steady-state numbers of a run from its metrics.jsonl: one markdown table row per run.

    beit3-run-summary runs/giant/tensorboard/metrics.jsonl --skip 10
    beit3-run-summary a/metrics.jsonl b/metrics.jsonl --names triton,reference

The first logged intervals carry start-up (autotuning, allocator warm-up, compilation), so
`--skip` leaves out the log lines up to that step; what is left is summarised by its median,
the number BENCHMARKS.md records. Peak memory is the largest value seen.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Optional

from megatron_style.train.plot import read_metrics

# (metrics key, column title, format, how to combine the steady-state values)
COLUMNS = (
    ("time/step_s", "step s", "{:.3f}", statistics.median),
    ("throughput/samples_per_s", "samples/s", "{:.1f}", statistics.median),
    ("throughput/tokens_per_s", "tokens/s", "{:,.0f}", statistics.median),
    ("perf/tflops_per_device", "TFLOP/s per GPU", "{:.1f}", statistics.median),
    ("perf/mfu", "MFU", "{:.1%}", statistics.median),
    ("memory/peak_gib", "peak GiB", "{:.1f}", max),
)


def summarize(rows: list[dict], skip: int) -> dict[str, float]:
    """Combined value per key over the rows logged after step `skip` (keys absent: left out)."""
    steady = [r for r in rows if r["step"] > skip]
    if not steady:
        last = rows[-1]["step"] if rows else 0
        raise ValueError(f"no logged step after --skip {skip} (the last logged step is {last})")
    out = {}
    for key, _, _, combine in COLUMNS:
        values = [r[key] for r in steady if key in r]
        if values:
            out[key] = combine(values)
    out["steps"] = len(steady)
    return out


def table(named: list[tuple[str, dict[str, float]]]) -> str:
    head = ["run", "logged intervals"] + [title for _, title, _, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in named:
        cells = [name, str(s["steps"])]
        cells += [fmt.format(s[key]) if key in s else "-" for key, _, fmt, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="beit3-run-summary", description=__doc__.split("\n")[0])
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files written by the trainer")
    p.add_argument("--skip", type=int, default=0, help="leave out log lines up to this step")
    p.add_argument("--names", default="", help="comma-separated run names (default: the paths)")
    args = p.parse_args(argv)
    names = args.names.split(",") if args.names else list(args.metrics)
    if len(names) != len(args.metrics):
        print(f"error: {len(names)} names for {len(args.metrics)} files", file=sys.stderr)
        return 2
    try:
        named = [(n, summarize(read_metrics(m), args.skip)) for n, m in zip(names, args.metrics)]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(named))
    return 0


if __name__ == "__main__":
    sys.exit(main())
