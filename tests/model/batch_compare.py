"""Field-by-field equality of two PackedBatches (tensors with dtype and shape, routes, the rest),
for the tests that check a batch built by index arithmetic against pack_samples."""
import dataclasses

import torch

from megatron_style.batch import PackedBatch, Route


def assert_same_batch(got: PackedBatch, want: PackedBatch, skip=()):
    for f in dataclasses.fields(PackedBatch):
        if f.name in skip:
            continue
        a, b = getattr(got, f.name), getattr(want, f.name)
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f.name
        elif isinstance(b, Route):
            assert a.counts == b.counts and torch.equal(a.perm, b.perm) \
                and torch.equal(a.inv, b.inv), f.name
        else:
            assert a == b, f.name
