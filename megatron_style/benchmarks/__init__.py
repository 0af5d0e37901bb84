"""Benchmarks that print numbers (BENCHMARKS.md records them with machine and date); speed and
memory goals are shown here, never by timed tests. Top layer, beside cli/: nothing imports it.

    python -m megatron_style.benchmarks.kernels         each Triton kernel vs its reference (GPU)
    python -m megatron_style.benchmarks.compile_report  registers / spills / shared memory per
                                                        kernel config for sm_90 (no GPU needed)
    python -m megatron_style.benchmarks.vs_torchscale   the model vs torchscale's BEiT3, fwd+bwd
    python -m megatron_style.benchmarks.loader          decode / augment / mask and shard loader
                                                        throughput against a training rate
"""
