"""pytest-benchmark entry for apply_rope on the CPU shapes:

    python -m pytest benchmarks/test_bench_rope.py [--benchmark-columns=median,min]

One test per (case, implementation), grouped per case; each is checked against DeepSeek's complex formula first.
"""
import pytest

from benchmarks import bench_rope
from benchmarks.harness import bench_with_pytest, case_id, make_context

CTX = make_context("cpu", "cpu")
PARAMS = [pytest.param(c, i, id=case_id(c, i)) for c in bench_rope.cases(CTX) for i in c.impls]


@pytest.mark.parametrize("case,impl", PARAMS)
def test_apply_rope(benchmark, case, impl):
    bench_with_pytest(benchmark, case, impl)
