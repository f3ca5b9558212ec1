"""pytest-benchmark entry for the loss family on the CPU shape (fused linear cross entropy, 1024 tokens x 256 x
32,000, fp32):

    python -m pytest benchmarks/test_bench_loss.py [--benchmark-columns=median,min]

One test per implementation (torch linear+CE, the chunked ``cpu`` backend, the unfused reference), each
checked against the torch baseline first; ``extra_info`` carries the peak extra memory the step holds
(measured once through the CPU allocator, see ``benchmarks.bench_loss.peak_extra_bytes``) and its ratio to
the torch baseline's.
"""
import pytest

from benchmarks import bench_loss
from benchmarks.harness import bench_with_pytest, case_id, make_context

CTX = make_context("cpu", "cpu")
PARAMS = [pytest.param(c, i, id=case_id(c, i)) for c in bench_loss.cases(CTX) for i in c.impls]


@pytest.mark.parametrize("case,impl", PARAMS)
def test_loss(benchmark, case, impl):
    bench_with_pytest(benchmark, case, impl)
    if impl.fn is None:
        return
    peak = bench_loss.peak_extra_bytes(impl.fn, CTX.device)
    base = bench_loss.peak_extra_bytes(case.impls[0].fn, CTX.device)
    benchmark.extra_info["peak_extra_bytes"] = peak
    if peak is not None and base:
        benchmark.extra_info["peak_extra_vs_torch"] = peak / base
        if impl.name == "cpu":  # the fused path: the requirement's 1/8 of the unfused head
            assert peak * 8 <= base, f"fused {peak / 2**20:.1f} MiB vs torch {base / 2**20:.1f} MiB"
