"""The data<->model contract, below both: `Sample` (what the data side produces), `PackedBatch`
(what the model consumes), `pack_samples` (one into the other) and `validate_packed`.

  types.py     ids (experts, Kind, target streams), Route, Sample, PackedBatch
  pack.py      pack_samples
  validate.py  validate_packed
  views.py     dual_encoder_views (a batch's pairs as an image-only and a text-only batch)
"""
from megatron_style.batch.pack import pack_samples
from megatron_style.batch.types import (KIND_IMAGE, KIND_NAMES, KIND_PAIR, KIND_TEXT, LANGUAGE,
                                        POSITION_OFFSET, S_IMAGE, S_PAIR_IMAGE, S_PAIR_TEXT,
                                        S_TEXT, TARGET_STREAMS, VISION, VL, Kind, PackedBatch,
                                        Route, Sample)
from megatron_style.batch.validate import validate_packed
from megatron_style.batch.views import DualEncoderViews, dual_encoder_views

__all__ = ["Kind", "KIND_IMAGE", "KIND_TEXT", "KIND_PAIR", "KIND_NAMES", "VISION", "LANGUAGE",
           "VL", "TARGET_STREAMS", "S_IMAGE", "S_TEXT", "S_PAIR_IMAGE", "S_PAIR_TEXT",
           "POSITION_OFFSET", "Route", "Sample", "PackedBatch", "pack_samples",
           "validate_packed", "DualEncoderViews", "dual_encoder_views"]
