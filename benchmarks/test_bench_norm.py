"""pytest-benchmark entry for RMSNorm on the CPU shapes:

    python -m pytest benchmarks/test_bench_norm.py [--benchmark-columns=median,min]

One test per (case, implementation), grouped per case; each is checked against the torch formula first.
"""
import pytest

from benchmarks import bench_norm
from benchmarks.harness import bench_with_pytest, case_id, make_context

CTX = make_context("cpu", "cpu")
PARAMS = [pytest.param(c, i, id=case_id(c, i)) for c in bench_norm.cases(CTX) for i in c.impls]


@pytest.mark.parametrize("case,impl", PARAMS)
def test_rms_norm(benchmark, case, impl):
    bench_with_pytest(benchmark, case, impl)
