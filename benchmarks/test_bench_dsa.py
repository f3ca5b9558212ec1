"""pytest-benchmark entry for DeepSeek Sparse Attention (the ``dsa`` family) on the smoke shapes:

    python -m pytest benchmarks/test_bench_dsa.py [--benchmark-columns=median,min]

One test per (case, implementation), grouped per case, each checked against the case's first torch baseline
first (the pure-torch indexer and decode references, the chunked gather for sparse prefill, SDPA for dense
MLA); then the formulas at V3.2's shapes and the cross-case speedups of ``bench_dsa.run``. The smoke shapes
(S = 256) rather than the ``cpu`` set keep the file well under 30 s on one thread.
"""
import pytest
import torch

from benchmarks import bench_dsa
from benchmarks.harness import bench_with_pytest, case_id, make_context
from benchmarks.shapes import shape_set

torch.set_num_threads(1)  # the CI machine has 2 cores, shared with other test files

CTX = make_context("cpu", "smoke")
PARAMS = [pytest.param(c, i, id=case_id(c, i)) for c in bench_dsa.cases(CTX) for i in c.impls]


@pytest.mark.parametrize("case,impl", PARAMS)
def test_dsa(benchmark, case, impl):
    bench_with_pytest(benchmark, case, impl)


def test_gpu_shapes_are_v32():
    pre = bench_dsa.prefill_shapes(shape_set("v3"))
    assert [s.seqlen for s in pre] == [8192, 16384, 32768, 65536]
    assert {(s.batch, s.heads, s.latent, s.dv, s.topk, s.index_heads, s.index_dim) for s in pre} == {
        (1, 128, 576, 512, 2048, 64, 128)}
    dec = bench_dsa.decode_shapes(shape_set("v3"))
    assert [(s.batch, s.seqlen, s.decode) for s in dec] == [(16, sl, True) for sl in (8192, 16384, 32768, 65536)]


def test_formulas():
    sh = bench_dsa.prefill_shapes(shape_set("v3"))[-1]  # S = 64k
    t = 65536
    # the written formulas: sparse 2 T H K (C + Dv), dense causal 2 T (T + 1) / 2 H (C + Dv)
    assert bench_dsa.sparse_flops(sh, "fwd") == 2 * t * 128 * 2048 * 1088
    assert bench_dsa.dense_flops(sh, "fwd") == t * (t + 1) * 128 * 1088
    assert bench_dsa.sparse_flops(sh, "fwd+bwd") == 3.5 * bench_dsa.sparse_flops(sh, "fwd")
    # at 64k a query attends to K = 2048 rows against (T + 1) / 2 on average: 16x fewer FLOPs
    assert bench_dsa.dense_flops(sh, "fwd") / bench_dsa.sparse_flops(sh, "fwd") == pytest.approx((t + 1) / 2 / 2048)
    # the indexer over all causal pairs: 64 heads x (128 + 1), about 35 TFLOP
    assert bench_dsa.indexer_flops(sh) == pytest.approx(t * (t + 1) / 2 * 2 * 64 * 129)
    # decode at 64k, B = 16, bf16: the selected rows (16 x 2048 x 576 x 2 B = 37.7 MB) plus q, out, idx and page
    # ids (4.7 MB) against the whole cache (16 x 65536 x 576 x 2 B = 1.21 GB) plus the same q and out: 28.5x
    dec = bench_dsa.decode_shapes(shape_set("v3"))[-1]
    sparse = bench_dsa.sparse_decode_bytes(dec, 2)
    dense = bench_dsa.dense_decode_bytes(bench_dsa._mla_decode_shape(dec), 2)
    assert sparse == 16 * (2048 * 576 * 2 + 128 * 576 * 2 + 128 * 512 * 2 + 8 * 2048 + 4)
    assert 1.208e9 < dense < 1.213e9
    assert 28 < dense / sparse < 29
    assert bench_dsa.sparse_decode_flops(dec) == 2 * 16 * 128 * 2048 * 1088


def test_torch_sparse_prefill_matches_the_reference():
    # the chunked torch baseline computes the reference's output, whatever the chunk
    from r1kernels.reference import sparse_dsa as ref

    sh = bench_dsa.prefill_shapes(CTX.shapes)[0]
    x = bench_dsa._indexer_inputs(CTX, sh)
    idx = bench_dsa._select(x, sh.topk).view(sh.tokens, sh.topk)
    assert (idx[:5] < 0).any() and (idx[-1] >= 0).all()  # early queries see fewer than K positions
    q, kv = CTX.randn(sh.tokens, sh.heads, sh.latent), CTX.randn(sh.tokens, sh.latent)
    cu = torch.tensor([0, sh.tokens], dtype=torch.int32)
    want = ref.dsa_mla_prefill(q, kv, idx, cu, softmax_scale=0.1, head_dim_v=sh.dv)[0]
    for chunk in (37, bench_dsa.PREFILL_CHUNK):
        torch.testing.assert_close(bench_dsa.torch_sparse_prefill(q, kv, idx, 0.1, sh.dv, chunk), want)


def test_run_links_dsa_rows_to_dense():
    ctx = make_context("cpu", "smoke")
    ctx.cpu_budget_s = 0.02
    lines = []
    rows = bench_dsa.run(ctx, {}, log=lines.append)
    ran = [r for r in rows if r.status == "ok"]
    assert {r.op for r in ran} == {"dsa_indexer", "dsa_mla_prefill", "dense_mla_prefill", "dsa_mla_decode",
                                   "mla_decode"}
    assert all(r.rel_err is not None and r.rel_err <= 1e-5 for r in ran)
    # every timed DSA row is set against its dense counterpart: SDPA for prefill, ops.mla_decode for decode
    dsa_rows = [r for r in ran if r.op.startswith("dsa_")]
    assert len(dsa_rows) == 10 and all(r.vs_torch > 0 for r in dsa_rows)
    assert {r.torch_ref for r in dsa_rows if "page" not in r.shape} == {bench_dsa.DENSE}
    assert all(r.torch_ref.startswith("mla_decode ") for r in dsa_rows if "page" in r.shape)
    # mla_attention in the absorbed form ran on the CPU (cpu and reference backends) against SDPA
    assert {r.impl for r in ran if r.op == "dense_mla_prefill"} == {bench_dsa.DENSE, "cpu", "reference"}
    # the Triton rows are recorded, with the reason they did not run here
    tri = [r for r in rows if r.impl == "triton"]
    assert len(tri) == 8 and all(r.status == "unavailable" and "interpreter" in r.note for r in tri)
    # the log's summary: each pass against dense, with and without the indexer, and decode bytes per step
    assert any("prefill S=256 fwd+bwd: dsa_mla_prefill (reference)" in line and "with indexer+topk" in line
               for line in lines)
    assert any("decode B=2 S=256: dsa_mla_decode" in line and "bytes per step" in line for line in lines)
