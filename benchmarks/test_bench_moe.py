"""pytest-benchmark entry for the MoE gate and routed-expert layer on the CPU shapes:

    python -m pytest benchmarks/test_bench_moe.py [--benchmark-columns=median,min]

One test per (case, implementation), grouped per case; each is checked against the case's first torch
baseline first (the routing formula, the loop over experts).
"""
import pytest

from benchmarks import bench_moe
from benchmarks.harness import bench_with_pytest, case_id, make_context

CTX = make_context("cpu", "cpu")
PARAMS = [pytest.param(c, i, id=case_id(c, i)) for c in bench_moe.cases(CTX) for i in c.impls]


@pytest.mark.parametrize("case,impl", PARAMS)
def test_moe(benchmark, case, impl):
    bench_with_pytest(benchmark, case, impl)
