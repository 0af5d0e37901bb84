"""megatron_style: open pretraining for BEiT-3 style Multiway Transformers."""

__version__ = "0.1.0"
