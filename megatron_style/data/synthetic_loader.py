"""`data.source: synthetic`: random images and texts with random targets, no decoding, no
tokenizers. For throughput and memory measurements (the giant on one GPU) and tests; the
batches have the configured stream mix and text length, like real ones."""
from __future__ import annotations

from typing import Any, Iterator

import torch

from megatron_style.config import PretrainConfig
from megatron_style.batch import PackedBatch, pack_samples
from megatron_style.batch.synthetic import random_sample


class SyntheticLoader:
    def __init__(self, cfg: PretrainConfig, dp_rank: int, dp_world: int):
        self.cfg, self.dp_rank, self.dp_world = cfg, dp_rank, dp_world
        self.counts = cfg.data.stream_counts()
        self.next_index = 0

    def __iter__(self) -> Iterator[PackedBatch]:
        while True:
            # Count the batch as consumed when it is handed out, so that a state saved after
            # using it points at the next one.
            index = self.next_index
            self.next_index += 1
            yield self.batch(index)

    def batch(self, index: int) -> PackedBatch:
        d, m = self.cfg.data, self.cfg.model
        g = torch.Generator().manual_seed(hash((d.seed, self.dp_rank, index)) % (2 ** 63))
        text_len = min(d.synthetic_text_len, m.max_text_len)
        mk = d.masking
        samples = [random_sample(m, kind, text_len, g, mk.image_ratio, mk.text_ratio,
                                 mk.pair_image_ratio)
                   for kind, n in self.counts.items() for _ in range(n)]
        return pack_samples(samples, m)

    def state_dict(self) -> dict[str, Any]:
        return {"next_index": self.next_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_index = int(state["next_index"])

    def layout_changed(self, state: dict[str, Any]) -> bool:
        return False  # batches depend on (seed, rank, index) only

    def load_resharded(self, states: list[dict[str, Any]]) -> str:
        """On another number of ranks: go on after the furthest old rank's batch index."""
        self.next_index = max(int(s["next_index"]) for s in states)
        return f"synthetic batch {self.next_index}"

    def bad_sample_counts(self) -> dict[str, int]:
        return {}
