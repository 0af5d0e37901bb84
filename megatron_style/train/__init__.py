"""Pretraining on DeepSpeed: entry point, engine, loop, checkpoints, metrics, evaluation."""
