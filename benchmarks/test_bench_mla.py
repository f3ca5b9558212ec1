"""pytest-benchmark entry for MLA on the CPU shapes, and the tiny model's generation with both caches:

    python -m pytest benchmarks/test_bench_mla.py [--benchmark-columns=median,min]

One test per (case, implementation), grouped per case, each checked against the case's first torch baseline
first (the batched-matmul decode, SDPA); then greedy generation with the latent cache and with the expanded
per-head cache, whose logits are checked against each other when the pair is built.
"""
import pytest

from benchmarks import bench_mla
from benchmarks.harness import bench_with_pytest, case_id, make_context
from benchmarks.shapes import mla_generate_shape, shape_set

CTX = make_context("cpu", "cpu")
PARAMS = [pytest.param(c, i, id=case_id(c, i)) for c in bench_mla.cases(CTX) for i in c.impls]


@pytest.mark.parametrize("case,impl", PARAMS)
def test_mla(benchmark, case, impl):
    bench_with_pytest(benchmark, case, impl)


@pytest.fixture(scope="module")
def generation():
    setup = bench_mla.build_generation(mla_generate_shape(shape_set("cpu")))
    assert setup.max_abs_diff <= bench_mla.MODEL_ATOL, f"logits differ by {setup.max_abs_diff:.2e}"
    return setup


@pytest.mark.parametrize("cache", ["latent", "expanded"])
def test_mla_generate(benchmark, generation, cache):
    gen = generation.latent if cache == "latent" else generation.expanded
    sh = generation.shape
    benchmark.group = f"mla generate {sh.shape}"
    toks = benchmark.pedantic(lambda: bench_mla.generate(gen, generation.prompt, sh.new), rounds=3, warmup_rounds=1)
    assert toks.shape == (sh.batch, sh.new)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = sh.batch * sh.new / benchmark.stats.stats.median
