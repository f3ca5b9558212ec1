"""pytest-benchmark entry for sampling on the CPU shapes:

    python -m pytest benchmarks/test_bench_sampling.py [--benchmark-columns=median,min]

One test per (case, implementation), grouped per case. Draws are random, so each implementation's output is
checked (every token inside the reference's filtered set; verify: drafts, emitted token, -1 padding) rather
than compared with a baseline, then timed.
"""
import pytest

from benchmarks import bench_sampling
from benchmarks.harness import case_id, make_context

CTX = make_context("cpu", "cpu")
PARAMS = [pytest.param(cc, i, id=case_id(cc.case, i)) for cc in bench_sampling.cases(CTX) for i in cc.case.impls]


@pytest.mark.parametrize("cc,impl", PARAMS)
def test_sampling(benchmark, cc, impl):
    if impl.fn is None:
        pytest.skip(impl.why_not or "unavailable")
    why = cc.check(impl.fn())
    assert why is None, f"{impl.name}: {why}"
    case = cc.case
    benchmark.group = f"{case.op} {case.label} {case.shape} {case.mode}"
    benchmark(impl.fn)
    benchmark.extra_info.update({"shape": case.shape, "impl": impl.name})
    if benchmark.stats is not None and case.nbytes:  # None under --benchmark-disable
        benchmark.extra_info["GBps"] = case.nbytes / (benchmark.stats.stats.median * 1e3) / 1e6
