"""Fused kernels for the Multiway Transformer, each with a plain PyTorch reference beside it.

The model calls only `kernels.dispatch`; it picks Triton on CUDA when available and the
reference everywhere else (or when the config says `model.kernels: reference`).
"""
