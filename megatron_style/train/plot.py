"""Training curves from a run's metrics.jsonl as one PNG: loss and masked-token accuracy per
stream, learning rate, throughput. For a quick look without starting TensorBoard.

    beit3-plot runs/demo/tensorboard/metrics.jsonl --out demo.png
"""
from __future__ import annotations

import json

STREAMS = ("image", "text", "pair_image", "pair_text")


def read_metrics(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    # A later row of the same step replaces the earlier one's keys (a resumed run rewrites its
    # steps) and adds its own (validation writes its `val/*` row beside the step's training row).
    by_step: dict = {}
    for r in rows:
        by_step.setdefault(r["step"], {}).update(r)
    return [by_step[s] for s in sorted(by_step)]


def plot(rows: list[dict], out: str, title: str = "") -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install matplotlib") from None
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for s in STREAMS:
        pts = [(r["step"], r[f"loss/{s}"]) for r in rows if f"loss/{s}" in r]
        if pts:
            axes[0].plot(*zip(*pts), label=s)
        pts = [(r["step"], r[f"acc/{s}"]) for r in rows if f"acc/{s}" in r]
        if pts:
            axes[1].plot(*zip(*pts), label=s)
    axes[0].set_title("masked-token loss")
    axes[1].set_title("masked-token accuracy")
    axes[2].plot(steps, [r.get("lr", float("nan")) for r in rows])
    axes[2].set_title("learning rate")
    axes[3].plot(steps, [r.get("throughput/samples_per_s", float("nan")) for r in rows])
    axes[3].set_title("samples / s")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
