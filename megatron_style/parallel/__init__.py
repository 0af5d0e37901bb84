"""Tensor parallelism (Megatron style) for the Multiway Transformer."""
