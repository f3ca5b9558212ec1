"""pytest-benchmark entry for NSA (the ``sparse`` family) on the CPU shapes:

    python -m pytest benchmarks/test_bench_sparse.py [--benchmark-columns=median,min]

One test per (case, implementation), grouped per case, each checked against the case's first torch baseline
first (the pure-torch NSA spec for the NSA cases, SDPA for the dense ones); then the formulas and the
cross-case speedups of ``bench_sparse.run`` on the smoke shapes.
"""
import pytest

from benchmarks import bench_sparse
from benchmarks.harness import bench_with_pytest, case_id, make_context

CTX = make_context("cpu", "cpu")
PARAMS = [pytest.param(c, i, id=case_id(c, i)) for c in bench_sparse.cases(CTX) for i in c.impls]


@pytest.mark.parametrize("case,impl", PARAMS)
def test_sparse(benchmark, case, impl):
    bench_with_pytest(benchmark, case, impl)


def test_formulas():
    # S = 64 with the paper's geometry: compressed keys C(t) = floor((t - 31) / 16) + 1 for t >= 31 (1 for
    # t = 31..46, 2 for 47..62, 3 for t = 63): 16 + 32 + 3 = 51; one selection block, so Sel(t) = W(t) = t + 1.
    c, sel, win = bench_sparse.visible_counts(64)
    assert (c, sel, win) == (51, 64 * 65 // 2, 64 * 65 // 2)
    # at 64k, a query sees n l' = 1024 selected keys, w = 512 window keys and 4095 compressed ones
    assert bench_sparse.decode_counts(65536) == (4095, 1024, 512, 1024)
    sh = bench_sparse.NSAShape(1, 65536, 64, 4, 128, 128)
    # NSA's forward is a small fraction of dense causal attention's FLOPs at 64k
    assert bench_sparse.nsa_flops(sh, "fwd") < 0.15 * bench_sparse.dense_flops(sh, "fwd")
    # decode reads ~15.7 MB at 64k for one sequence, against 134 MB for dense attention
    one = bench_sparse.NSAShape(1, 65536, 64, 4, 128, 128)
    assert 15.5e6 < bench_sparse.decode_bytes(one, 2) < 16e6
    assert bench_sparse.dense_decode_bytes(one, 2) > 134e6


def test_run_links_nsa_rows_to_dense_sdpa():
    ctx = make_context("cpu", "smoke")
    ctx.cpu_budget_s = 0.02
    rows = bench_sparse.run(ctx, {}, log=lambda line: None)
    ran = [r for r in rows if r.status == "ok"]
    assert {r.op for r in ran} == {"nsa_attention", "dense_attention", "nsa_decode", "dense_decode"}
    assert all(r.rel_err is not None and r.rel_err <= 1e-5 for r in ran)
    linked = [r for r in ran if r.impl == "reference"]
    assert len(linked) == 3 and all(r.torch_ref == bench_sparse.DENSE and r.vs_torch > 0 for r in linked)
    # fla is a CUDA peer: recorded as unavailable here, with the reason
    fla = [r for r in rows if r.impl == bench_sparse.PEER]
    assert len(fla) == 2 and all(r.status == "unavailable" and r.note for r in fla)
