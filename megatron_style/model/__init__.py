"""The BEiT-3 Multiway Transformer and its masked-data-modeling heads."""
from megatron_style.model.batch import PackedBatch, Route, Sample, pack_samples
from megatron_style.model.pretraining import MaskedDataModel, MDMOutput
from megatron_style.model.transformer import MultiwayTransformer

__all__ = ["MaskedDataModel", "MDMOutput", "MultiwayTransformer", "PackedBatch", "Route",
           "Sample", "pack_samples"]
