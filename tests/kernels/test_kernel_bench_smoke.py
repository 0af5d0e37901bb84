"""The benchmark script runs end to end (tiny shapes, CPU interpreter; timings meaningless):
the numbers themselves come from tests/bench on a GPU."""
import pytest

from kernels import triton_support
from megatron_style.benchmarks import kernels as bench


@pytest.mark.interpreter
@pytest.mark.skipif(not triton_support.INTERPRETER, reason="the smoke run uses the CPU interpreter")
def test_bench_smoke_run_writes_a_table():
    rows = bench.run(list(bench.BENCHES), smoke=True)
    table = bench.markdown(rows)
    kernels = {r.kernel for r in rows}
    assert kernels == {"attention", "routed FFN", "LayerNorm", "cross-entropy"}
    assert all(r.ms > 0 for r in rows if r.ms == r.ms)
    assert table.count("\n") == len(rows) + 1 and "baseline / Triton" in table
