"""Shared test setup: the Triton interpreter switch, the tolerance table, and the gpu marker.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at the top of the
first file pytest loads, whenever no CUDA device is visible.
"""
import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One torch thread for the suite (R1K_TEST_THREADS overrides): most tests run tiny models and shapes whose
# ops take microseconds, where OpenMP's fork/join costs more than it saves, and on a 2-core machine shared
# with other work 2 threads made them 4-10x slower (test_generate.py: 334 s with 2 threads, 80 s with 1,
# same load). The C++ kernels' own OpenMP regions are unaffected.
torch.set_num_threads(int(os.environ.get("R1K_TEST_THREADS", "1")))

# The one tolerance table (DESIGN "Tests"): (atol, rtol) per dtype of the tensors compared, for the
# comparison of a kernel against its reference. Reasoning: fp32 kernels reorder sums (~1e-6 relative);
# fp16 / bf16 outputs are rounded once at the end (half an ulp: 2^-11 / 2^-8 relative) plus reordering.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
# Model-level comparisons (whole forward passes against transformers), fp32 on CPU: the bound.
MODEL_ATOL = 1e-4


def tol(dtype: torch.dtype) -> dict:
    return TOL[dtype]


def assert_reduction_close(actual, expected, abs_sum, dtype):
    """The table's rule for results that are sums over many terms (weight gradients summed over rows).

    Summed in another order, a float sum of N terms moves by up to ~sqrt(N)*eps*(sum of |terms|) whatever
    the size of the result (terms of both signs cancel), so TOL[dtype]'s (atol, rtol) are applied relative
    to ``abs_sum``, the sum of |terms| of each output element (computed by the caller from the reference).
    """
    assert actual.dtype == expected.dtype
    t = TOL[dtype]
    err = (actual.float() - expected.float()).abs()
    bound = t["atol"] + t["rtol"] * torch.maximum(abs_sum.float(), expected.float().abs())
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, worst error / bound {(err / bound).max().item():.3g}"


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
