"""pytest-benchmark entry for the whole tiny model's forward, r1kernels against transformers:

    python -m pytest benchmarks/test_bench_model.py

Both tests share one pair of models (same config and weights, logits checked when the pair is built).
"""
import pytest

from benchmarks import bench_model
from benchmarks.shapes import model_shape, shape_set


@pytest.fixture(scope="module")
def pair():
    why = bench_model.missing_api()
    if why is not None:
        pytest.skip(why)
    p = bench_model.build(model_shape(shape_set("cpu")))
    assert p.max_abs_diff <= bench_model.MODEL_ATOL, f"logits differ by {p.max_abs_diff:.2e}"
    return p


@pytest.mark.parametrize("impl", ["r1kernels", "transformers"])
def test_model_forward(benchmark, pair, impl):
    fn = pair.r1k if impl == "r1kernels" else pair.hf
    benchmark.group = f"model forward {tuple(pair.ids.shape)}"
    logits = benchmark.pedantic(bench_model._timed(fn, pair.ids), rounds=5, warmup_rounds=2)
    assert logits.shape[:2] == pair.ids.shape
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = pair.ids.numel() / benchmark.stats.stats.median
