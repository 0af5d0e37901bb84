"""Kernel microbenchmarks at the giant's shapes (H100 / H200, bf16). They print a markdown table
(paste it into BENCHMARKS.md) and check only that each benchmark ran and agreed with its
baseline: speed goals are read off the numbers, not asserted.

    pytest tests/bench/test_kernels_bench.py -m bench -s
    python -m megatron_style.benchmarks.kernels --out kernels.md      # the same, as one command
"""
import pytest

from megatron_style.benchmarks import kernels as bench

pytestmark = [pytest.mark.bench, pytest.mark.gpu]


@pytest.mark.parametrize("name", list(bench.BENCHES))
def test_kernel_benchmark(name):
    rows = bench.run([name], smoke=False)
    print("\n" + bench.markdown(rows, f"{name} on {bench.environment()}\n"))
    triton_rows = [r for r in rows if r.impl.startswith("Triton") and r.ms == r.ms]
    assert triton_rows and all(r.ms > 0 for r in triton_rows)
