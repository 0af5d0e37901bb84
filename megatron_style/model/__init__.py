"""The BEiT-3 Multiway Transformer and its masked-data-modeling heads. It reads the packed
batches of megatron_style.batch."""
from megatron_style.model.pretraining import MaskedDataModel, MDMOutput
from megatron_style.model.transformer import MultiwayTransformer

__all__ = ["MaskedDataModel", "MDMOutput", "MultiwayTransformer"]
