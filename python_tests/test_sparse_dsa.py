"""DeepSeek Sparse Attention (V3.2): lightning indexer, top-k, sparse MLA prefill / decode, indexer KL loss.

The Triton backend against the references (forward and backward), sparse attention with every position
selected against the dense MLA references, exact top-k sets with ties, NaN-poisoned slots that must never
leak, and argument errors. Runs on the GPU when there is one, else under the Triton interpreter (conftest
sets TRITON_INTERPRET); bf16 only on the GPU. Small shapes: C = 32 + 16, H = 4, K = 8..40.
"""
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_reduction_close, tol

from r1kernels import reference
from r1kernels.ops import sparse_dsa as dsa
from r1kernels.reference import sparse_dsa as ref
from r1kernels.triton.sparse_dsa import dsa_mla_decode as triton_decode

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERP_DTYPES = [torch.float32, torch.float16]
H, C, L = 4, 48, 32  # heads, latent row width (L + R = 32 + 16), value width
SCALE = 0.2
FP32 = tol(torch.float32)


def _rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEV, dtype=dtype)


def _randint(lo, hi, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int32).to(DEV)


def _grads(fn, inputs, cotangents):
    """Outputs of ``fn(*inputs)`` and the gradients of sum(out_i * cotangent_i) w.r.t. the float inputs."""
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]  # strides kept
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((torch.where(torch.isfinite(o), o, 0).float() * c.float()).sum() for o, c in zip(outs, cotangents))
    loss.backward()
    return outs, [x.grad for x in leaves if x.is_floating_point()]


# --------------------------------------------------------------------------------------------------------
# Lightning indexer


def _indexer_inputs(b, s, t, hi, di, dtype, seed):
    q = _rand(b, s, hi, di, dtype=dtype, seed=seed)
    # k as a column slice of a wider tensor (row stride > Di), weights transposed: any strides are read.
    k = _rand(b, t, di + 8, dtype=dtype, seed=seed + 1)[..., 4:4 + di]
    w = _rand(b, hi, s, seed=seed + 2).transpose(1, 2)
    pos = torch.randint(-1, t + 3, (b, s), generator=torch.Generator().manual_seed(seed)).to(DEV)
    return q, k, w, pos


def _indexer_abs_sums(q, k, w, pos, g):
    """Per gradient element, the sum of |terms| it is made of (the tolerance scale of a reduction)."""
    z = torch.einsum("bsjd,btd->bsjt", q.float(), k.float())
    vis = torch.arange(k.shape[1], device=DEV)[None, None, :] <= pos[:, :, None]
    ga = torch.where(vis, g.float().abs(), 0)[:, :, None, :]  # [B, S, 1, T]
    live = ga * w.float().abs()[..., None] * (z > 0)  # |g * w * relu'(z)|, [B, S, Hi, T]
    dq = torch.einsum("bsjt,btd->bsjd", live, k.float().abs())
    dk = torch.einsum("bsjt,bsjd->btd", live, q.float().abs())
    return dq, dk, (ga * z.clamp_min(0)).sum(-1)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 19, 3, 24), (1, 33, 40, 2, 16)], ids=["odd", "multi-tile"])
def test_indexer_matches_reference(shape, dtype):
    b, s, t, hi, di = shape
    q, k, w, pos = _indexer_inputs(b, s, t, hi, di, dtype, seed=t)
    g = _rand(b, s, t, seed=9)
    fn = lambda *x: dsa.lightning_indexer(*x[:3], q_positions=pos, backend="triton")  # noqa: E731
    (out,), (dq, dk, dw) = _grads(fn, (q, k, w), (g,))
    (want,), (rq, rk, rw) = _grads(lambda *x: ref.lightning_indexer(*x, q_positions=pos), (q, k, w), (g,))
    assert out.dtype == torch.float32 and out.shape == (b, s, t)
    assert torch.equal(torch.isinf(out), torch.isinf(want))  # the causal mask, position by position
    # fp32 output either way: the products of fp16 inputs are exact in fp32, only the order of sums differs.
    torch.testing.assert_close(out, want, **FP32)
    aq, ak, aw = _indexer_abs_sums(q, k, w, pos, g)
    assert_reduction_close(dq, rq, aq, dtype)
    assert_reduction_close(dk, rk, ak, dtype)
    assert_reduction_close(dw, rw, aw, torch.float32)
    assert dq.dtype == dtype and dk.dtype == dtype and dw.dtype == torch.float32


def test_indexer_never_reads_unseen_keys():
    """Keys past every query's position hold NaN (unwritten cache slots): scores and gradients stay finite."""
    b, s, t, hi, di = 2, 5, 21, 2, 16
    q, k, w, _ = _indexer_inputs(b, s, t, hi, di, torch.float32, seed=3)
    pos = torch.tensor([[0, 3, 4, 6, 7], [-1, 2, 9, 9, 9]], device=DEV)
    k = k.clone()
    k[0, 8:] = float("nan")
    k[1, 10:] = float("nan")
    vis = torch.arange(t, device=DEV)[None, None, :] <= pos[:, :, None]
    # The gradient arriving at masked scores is garbage (NaN, large): it must be dropped, as masked_fill does.
    g = torch.where(vis, _rand(b, s, t, seed=4), float("nan"))
    g[0, 0, 5] = 1e3

    def fwd_bwd(fn, kk):
        leaves = [x.detach().requires_grad_(True) for x in (q, kk, w)]
        out = fn(*leaves, q_positions=pos)
        out.backward(g)
        return out, [x.grad for x in leaves]

    out, grads = fwd_bwd(lambda *x, **kw: dsa.lightning_indexer(*x, **kw, backend="triton"), k)
    assert bool(torch.isfinite(out[vis]).all()) and bool((out[~vis] == float("-inf")).all())
    assert all(bool(torch.isfinite(x).all()) for x in grads)
    want, ref_grads = fwd_bwd(ref.lightning_indexer, torch.where(torch.isnan(k), 0, k))
    torch.testing.assert_close(out, want, **FP32)
    for got, exp in zip(grads, ref_grads):
        torch.testing.assert_close(got, exp, **FP32)


# --------------------------------------------------------------------------------------------------------
# Top-k


def _tied_scores(b, s, t, seed):
    """Scores with many exact ties (a few distinct values), -0.0 next to +0.0, causal -inf, NaN and +inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (b, s, t), generator=g).float() * 0.5
    x[x == 0] = torch.where(torch.rand(int((x == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    pos = torch.randint(0, t, (b, s), generator=g)
    x = x.masked_fill(torch.arange(t)[None, None, :] > pos[:, :, None], float("-inf"))
    x[0, 0, 0] = float("nan")
    x[-1, -1, 0] = float("inf")
    x[0, 1, :] = float("-inf")  # a query that sees nothing
    return x.to(DEV)


@pytest.mark.parametrize("k", [1, 5, 16, 40])
@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_topk_exact_with_ties(k, dtype):
    scores = _tied_scores(3, 6, 37, seed=k).to(dtype)
    lengths = torch.tensor([37, 20, 1], dtype=torch.int32, device=DEV)
    got = dsa.dsa_topk(scores, k, lengths=lengths, backend="triton")
    want = dsa.dsa_topk(scores, k, lengths=lengths, backend="reference")
    assert got.dtype == torch.int32 and got.shape == (3, 6, k)
    assert torch.equal(got, want)  # the same set, and the same (ascending) order


def test_topk_is_the_top_set():
    """Independently of the reference: the selected scores are torch.topk's values, ties go to low positions."""
    t, k = 50, 12
    scores = _tied_scores(2, 5, t, seed=1)
    lengths = torch.tensor([t, 30], dtype=torch.int32, device=DEV)
    got = dsa.dsa_topk(scores, k, lengths=lengths, backend="triton")
    x = scores.clone()
    x[1, :, 30:] = float("-inf")
    x = torch.where(torch.isnan(x), float("-inf"), x)
    for bi in range(2):
        for si in range(5):
            row = got[bi, si]
            sel = row[row >= 0].long()
            n_vis = int((x[bi, si] > float("-inf")).sum())
            assert sel.numel() == min(k, n_vis) and bool((row[sel.numel():] == -1).all())
            assert bool((sel[1:] > sel[:-1]).all())  # ascending, no repeats
            if sel.numel():
                top = torch.topk(x[bi, si], sel.numel()).values
                assert torch.equal(x[bi, si, sel].sort(descending=True).values, top)
                # the lowest selected value: every position before the last tie taken holds no unselected copy
                tau = x[bi, si, sel].min()
                ties = (x[bi, si] == tau).nonzero().flatten()
                assert torch.equal(ties[: int((x[bi, si, sel] == tau).sum())], sel[x[bi, si, sel] == tau])


def test_topk_long_rows_and_strides():
    """Rows longer than one tile (the chunked passes) and a non-contiguous score tensor."""
    t = 1500
    g = torch.Generator().manual_seed(5)
    base = (torch.randint(0, 40, (2, t, 3), generator=g).float() / 4).to(DEV)  # heavy ties
    scores = base.transpose(1, 2)  # [2, 3, T], stride 1 along S
    lengths = torch.tensor([t, 1111], dtype=torch.int32, device=DEV)
    for k in (7, 64):
        got = dsa.dsa_topk(scores, k, lengths=lengths, backend="triton")
        assert torch.equal(got, ref.dsa_topk(scores, k, lengths=lengths))


# --------------------------------------------------------------------------------------------------------
# Sparse MLA prefill


def _prefill_inputs(lens, k, dtype, seed):
    tt = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    q = _rand(tt, H, C, dtype=dtype, seed=seed)
    kv = _rand(tt, C, dtype=dtype, seed=seed + 1)
    # Random selections: -1, positions past the sequence (ignored), and repeats.
    idx = _randint(-1, max(lens) + 2, (tt, k), seed=seed + 2)
    return q, kv, idx, cu


def _prefill_abs_sums(q, kv, idx, cu, dout, dlse, scale=SCALE, v=L):
    """Per element of dq and dkv, the sum of |terms| of the backward (the tolerance scale of a reduction)."""
    tt, _, c = q.shape
    seq = torch.searchsorted(cu.long(), torch.arange(tt, device=DEV), right=True) - 1
    start, n = cu.long()[seq], cu.long()[seq + 1] - cu.long()[seq]
    pos = idx.long()
    valid = (pos >= 0) & (pos < n[:, None])
    row_id = torch.where(valid, start[:, None] + pos, 0)
    rows = torch.where(valid[..., None], kv.float()[row_id], 0)  # [Tt, K, C]
    s = torch.einsum("qhc,qkc->qhk", q.float(), rows) * scale
    p = torch.softmax(s.masked_fill(~valid[:, None], float("-inf")), -1).nan_to_num(0)
    o = torch.einsum("qhk,qkv->qhv", p, rows[..., :v])
    dp = torch.einsum("qhv,qkv->qhk", dout.float(), rows[..., :v])
    ds = (p * (dp - ((dout.float() * o).sum(-1) - dlse)[..., None])).abs()  # [Tt, H, K]
    dq = torch.einsum("qhk,qkc->qhc", ds, rows.abs()) * scale
    per = torch.einsum("qhk,qhc->qkc", ds, q.float().abs()) * scale  # [Tt, K, C] each slot's share of dkv
    per[..., :v] += torch.einsum("qhk,qhv->qkv", p, dout.float().abs())
    dkv = torch.zeros(tt, c, device=DEV).index_add_(0, row_id.flatten(), (per * valid[..., None]).reshape(-1, c))
    return dq, dkv


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("lens,k", [([5, 0, 17, 1], 8), ([23, 9], 40)], ids=["k8", "k40"])
def test_prefill_matches_reference(lens, k, dtype):
    q, kv, idx, cu = _prefill_inputs(lens, k, dtype, seed=k)
    dout = _rand(q.shape[0], H, L, dtype=dtype, seed=5)
    dlse = _rand(q.shape[0], H, seed=6)
    def fn(a, b):
        return dsa.dsa_mla_prefill(a, b, idx, cu, softmax_scale=SCALE, head_dim_v=L, backend="triton")

    def ref_fn(a, b):
        return ref.dsa_mla_prefill(a, b, idx, cu, softmax_scale=SCALE, head_dim_v=L)

    (out, lse), (dq, dkv) = _grads(fn, (q, kv), (dout, dlse))
    (rout, rlse), (rdq, rdkv) = _grads(ref_fn, (q, kv), (dout, dlse))
    assert out.shape == (q.shape[0], H, L) and out.dtype == dtype and lse.shape == (q.shape[0], H)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, rout, **tol(dtype))
    torch.testing.assert_close(lse, rlse, **FP32)  # -inf on both sides where a query selected nothing valid
    aq, akv = _prefill_abs_sums(q, kv, idx, cu, dout, torch.where(torch.isfinite(rlse), dlse, 0))
    assert_reduction_close(dq, rdq, aq, dtype)
    assert_reduction_close(dkv, rdkv, akv, dtype)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("h,c,v,k", [(16, 576, 512, 16), (80, 32, 16, 100), (4, 48, 48, 8), (3, 40, 24, 9)],
                         ids=["v3-widths", "two-head-blocks-k100", "no-rope-part", "odd-widths"])
def test_prefill_other_shapes(h, c, v, k, dtype):
    """V3's 576 = 512 + 64 rows; more heads than one program takes (two programs add into one dkv row) with
    K spanning two tiles; values as wide as the row; widths that are not powers of two."""
    lens = [6, 3]
    tt = sum(lens)
    cu = torch.tensor([0, 6, 9], dtype=torch.int32, device=DEV)
    q, kv = _rand(tt, h, c, dtype=dtype, seed=c), _rand(tt, c, dtype=dtype, seed=c + 1)
    idx = _randint(-1, 7, (tt, k), seed=k)
    scale = c ** -0.5
    dout = _rand(tt, h, v, dtype=dtype, seed=3)
    (out, lse), (dq, dkv) = _grads(lambda a, b: dsa.dsa_mla_prefill(a, b, idx, cu, softmax_scale=scale, head_dim_v=v,
                                                                    backend="triton"), (q, kv), (dout,))
    (rout, rlse), (rdq, rdkv) = _grads(lambda a, b: ref.dsa_mla_prefill(a, b, idx, cu, softmax_scale=scale,
                                                                        head_dim_v=v), (q, kv), (dout,))
    torch.testing.assert_close(out, rout, **tol(dtype))
    torch.testing.assert_close(lse, rlse, **FP32)
    aq, akv = _prefill_abs_sums(q, kv, idx, cu, dout, torch.zeros(tt, h, device=DEV), scale=scale, v=v)
    assert_reduction_close(dq, rdq, aq, dtype)
    assert_reduction_close(dkv, rdkv, akv, dtype)


def test_prefill_full_selection_equals_dense_mla():
    """Indexer -> top-k with K >= the sequence length selects every causal position: the sparse prefill is
    then the dense causal MLA attention (expanded form, reference.mla_attention), forward and backward."""
    b, n, hi, di = 2, 13, 2, 16
    qi, ki, w, _ = _indexer_inputs(b, n, n, hi, di, torch.float32, seed=1)
    pos = torch.arange(n, device=DEV)[None, :].expand(b, n)
    scores = dsa.lightning_indexer(qi, ki, w, q_positions=pos, backend="triton")
    idx = dsa.dsa_topk(scores, 16, lengths=torch.full((b,), n, dtype=torch.int32, device=DEV), backend="triton")
    causal = torch.where(torch.arange(16, device=DEV) <= torch.arange(n, device=DEV)[:, None],
                         torch.arange(16, device=DEV), -1)  # [n, 16]: query i keeps 0..i
    assert torch.equal(idx, causal.expand(b, n, 16).to(torch.int32))
    q, kv, _, cu = _prefill_inputs([n] * b, 16, torch.float32, seed=2)
    dout = _rand(b * n, H, L, seed=3)
    flat_idx = idx.reshape(b * n, 16)

    def sparse(a, c):
        return dsa.dsa_mla_prefill(a, c, flat_idx, cu, softmax_scale=SCALE, head_dim_v=L, backend="triton")

    (out, lse), (dq, dkv) = _grads(sparse, (q, kv), (dout, torch.zeros(b * n, H, device=DEV)))

    def dense(a, c):
        k_exp = c[:, None, :].expand(-1, H, -1)  # [Tt, H, C]: the one latent head shared by all heads
        return reference.mla_attention(a, k_exp, k_exp[..., :L], cu, n, softmax_scale=SCALE, causal=True,
                                       return_lse=True)

    (want, want_lse), (rdq, rdkv) = _grads(dense, (q, kv), (dout, torch.zeros(H, b * n, device=DEV)))
    torch.testing.assert_close(out, want, **FP32)
    torch.testing.assert_close(lse, want_lse.transpose(0, 1), **FP32)  # mla_attention's lse is [H, Tt]
    torch.testing.assert_close(dq, rdq, **FP32)
    torch.testing.assert_close(dkv, rdkv, **FP32)


def test_prefill_never_reads_other_sequences():
    """Selections past a sequence's end point into the next sequence, whose rows are NaN: ignored."""
    lens = [9, 6]
    q, kv, idx, cu = _prefill_inputs(lens, 12, torch.float32, seed=7)
    kv = kv.clone()
    kv[9:] = float("nan")
    idx = idx.clone()
    idx[:9, 0] = 12  # inside the packed tensor (row 21 would be out of it), past sequence 0's end
    dout = torch.zeros(15, H, L, device=DEV)
    dout[:9] = _rand(9, H, L, seed=8)
    def fn(a, c):
        return dsa.dsa_mla_prefill(a, c, idx, cu, softmax_scale=SCALE, head_dim_v=L, backend="triton")

    def first(a, c):  # sequence 0 alone, with its out-of-range selections
        return ref.dsa_mla_prefill(a, c, idx[:9], cu[:2], softmax_scale=SCALE, head_dim_v=L)

    (out, lse), (dq, dkv) = _grads(fn, (q, kv), (dout, torch.zeros(15, H, device=DEV)))
    assert all(bool(torch.isfinite(x[:9]).all()) for x in (out, dq, dkv))
    (rout, _), (rdq, rdkv) = _grads(first, (q[:9], kv[:9]), (dout[:9], torch.zeros(9, H, device=DEV)))
    torch.testing.assert_close(out[:9], rout, **FP32)
    torch.testing.assert_close(dq[:9], rdq, **FP32)
    torch.testing.assert_close(dkv[:9], rdkv, **FP32)


# --------------------------------------------------------------------------------------------------------
# Sparse MLA decode


def _paged(lens, page, dtype, seed, spare=2):
    """A NaN-filled cache ``[N, P, C]`` with shuffled page ids holding random rows for requests of ``lens``
    tokens; slots no request owns (page tails, spare pages, an extra block-table column) stay NaN.
    Returns (kv_cache, block_table, rows) with rows[b] request b's ``[lens[b], C]`` rows in position order."""
    g = torch.Generator().manual_seed(seed)
    m = max(-(-n // page) for n in lens) + 1
    n_pages = len(lens) * m + spare
    table = torch.randperm(n_pages, generator=g)[: len(lens) * m].view(len(lens), m).to(torch.int32)
    kv = torch.full((n_pages, page, C), float("nan"))
    rows = []
    for bi, n in enumerate(lens):
        r = torch.randn(n, C, generator=g)
        kv[table[bi, torch.arange(n) // page].long(), torch.arange(n) % page] = r
        rows.append(r.to(DEV, dtype))
    return kv.to(DEV, dtype), table.to(DEV), rows


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("k", [24, 100])
def test_decode_matches_reference_nan_never_leaks(dtype, num_splits, k):
    """K = 24 is one tile (split 3 leaves two splits empty), K = 100 two tiles (one per split)."""
    lens, s, page = [7, 1, 30, 0], 2, 8
    kv, table, _ = _paged(lens, page, dtype, seed=1)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = _rand(4, s, H, C, dtype=dtype, seed=2)
    # -1, positions at or past the length (NaN slots, or beyond any page), repeats.
    idx = _randint(-1, 34, (4, s, k), seed=3)
    out, lse = triton_decode(q, kv, table, seqlens, idx, SCALE, L, num_splits=num_splits)
    assert out.shape == (4, s, H, L) and out.dtype == dtype and lse.shape == (4, H, s)
    assert bool(torch.isfinite(out).all()), "a NaN slot (or 0/0) reached the output"
    rout, rlse = ref.dsa_mla_decode(q, kv, table, seqlens, idx, softmax_scale=SCALE, head_dim_v=L)
    torch.testing.assert_close(out, rout, **tol(dtype))
    torch.testing.assert_close(lse, rlse, **FP32)
    assert bool((lse[3] == float("-inf")).all()) and bool((out[3] == 0).all())  # the empty request


def test_strided_inputs():
    """Views with gaps everywhere: q / kv / idx of the prefill and q / cache / block table / idx of the decode."""
    lens, k = [7, 4], 8
    q, kv, idx, cu = _prefill_inputs(lens, k, torch.float32, seed=11)
    q_v = _rand(11, C + 8, H, seed=12)[:, :C].transpose(1, 2)  # [Tt, H, C], C not the fastest dim
    kv_v = _rand(11, 2 * C, seed=13)[:, ::2]
    idx_v = idx.t().contiguous().t()  # [Tt, K], column-major
    assert not (q_v.is_contiguous() or kv_v.is_contiguous() or idx_v.is_contiguous())
    out, lse = dsa.dsa_mla_prefill(q_v, kv_v, idx_v, cu, softmax_scale=SCALE, head_dim_v=L, backend="triton")
    want, want_lse = ref.dsa_mla_prefill(q_v.contiguous(), kv_v.contiguous(), idx, cu, softmax_scale=SCALE,
                                         head_dim_v=L)
    torch.testing.assert_close(out, want, **FP32)
    torch.testing.assert_close(lse, want_lse, **FP32)

    cache, table, _ = _paged(lens, 4, torch.float32, seed=14)
    buf = torch.full((2,) + tuple(cache.shape), float("nan"), device=DEV)
    buf[1] = cache
    wide_table = torch.full((2, 2 * table.shape[1]), -1, dtype=torch.int32, device=DEV)
    wide_table[:, ::2] = table
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    qd = _rand(2, H, 2, C, seed=15).transpose(1, 2)  # [B, S, H, C]
    idx_d = _randint(-1, 9, (2, k, 2), seed=16).transpose(1, 2)  # [B, S, K]
    for splits in (1, 2):
        out, lse = triton_decode(qd, buf[1], wide_table[:, ::2], seqlens, idx_d, SCALE, L, num_splits=splits)
        want, want_lse = ref.dsa_mla_decode(qd.contiguous(), cache, table, seqlens, idx_d.contiguous(),
                                            softmax_scale=SCALE, head_dim_v=L)
        torch.testing.assert_close(out, want, **FP32)
        torch.testing.assert_close(lse, want_lse, **FP32)


def test_decode_full_selection_equals_dense_mla_decode():
    """With every causal position selected, sparse decode is reference.mla_decode (S = 3 new tokens)."""
    lens, s, page = [3, 11, 20], 3, 4
    kv, table, _ = _paged(lens, page, torch.float32, seed=4)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = _rand(3, s, H, C, seed=5)
    ar = torch.arange(20, device=DEV)
    last = seqlens[:, None] - s + torch.arange(s, device=DEV)  # [B, S] position of each new query
    idx = torch.where(ar <= last[..., None], ar, -1).to(torch.int32)  # [B, S, 20]
    for splits in (1, 2):
        out, lse = triton_decode(q, kv, table, seqlens, idx, SCALE, L, num_splits=splits)
        want, want_lse = reference.mla_decode(q, kv, table, seqlens, softmax_scale=SCALE, causal=True, head_dim_v=L)
        torch.testing.assert_close(out, want, **FP32)
        torch.testing.assert_close(lse, want_lse, **FP32)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_decode_equals_last_prefill_row(dtype):
    """The same sequences, packed for the prefill and paged for the decode: the decode of each sequence's
    last token (its top-k row of the indexer) equals that token's prefill output."""
    lens, k, page = [12, 5], 8, 4
    kv_cache, table, rows = _paged(lens, page, dtype, seed=6)
    kv = torch.cat(rows)
    q = _rand(sum(lens), H, C, dtype=dtype, seed=7)
    cu = torch.tensor([0, 12, 17], dtype=torch.int32, device=DEV)
    qi, ki, w, _ = _indexer_inputs(2, 12, 12, 2, 16, torch.float32, seed=8)
    pos = torch.arange(12, device=DEV)[None, :].expand(2, 12)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    idx = dsa.dsa_topk(dsa.lightning_indexer(qi, ki, w, q_positions=pos, backend="triton"), k, lengths=seqlens,
                       backend="triton")  # [2, 12, K]; sequence 1 uses its first 5 queries
    packed_idx = torch.cat([idx[0], idx[1, :5]])
    out, lse = dsa.dsa_mla_prefill(q, kv, packed_idx, cu, softmax_scale=SCALE, head_dim_v=L, backend="triton")
    last = torch.tensor([11, 16], device=DEV)
    dq = q[last][:, None]  # [B, 1, H, C]
    didx = torch.stack([idx[0, 11], idx[1, 4]])[:, None]  # [B, 1, K]
    dout, dlse = dsa.dsa_mla_decode(dq, kv_cache, table, seqlens, didx, softmax_scale=SCALE, head_dim_v=L,
                                    backend="triton")
    torch.testing.assert_close(dout[:, 0], out[last], **tol(dtype))
    torch.testing.assert_close(dlse[..., 0], lse[last], **FP32)


# --------------------------------------------------------------------------------------------------------
# Indexer KL loss


def _kl_inputs(dtype, seed):
    b, s, t = 2, 5, 19
    x = _rand(b, s, t, seed=seed, scale=2.0)
    tgt = torch.rand(b, t, s, generator=torch.Generator().manual_seed(seed)).to(DEV).transpose(1, 2) * 4  # head sums
    mask = torch.arange(t, device=DEV)[None, None, :] > torch.tensor([[3, 9, 18, 0, 12], [18, 18, 7, 2, 5]],
                                                                      device=DEV)[:, :, None]
    x = x.masked_fill(mask, float("-inf"))
    tgt = tgt.masked_fill(mask, 0)
    tgt[1, 1] = 0  # a padding query: adds nothing
    x[1, 2] = float("-inf")  # a query with no visible key (and no target)
    tgt[1, 2] = 0
    return x.to(dtype), tgt


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_kl_matches_reference(dtype):
    x, tgt = _kl_inputs(dtype, seed=1)
    g = torch.tensor(3.0, device=DEV)
    (loss,), (dx,) = _grads(lambda a: dsa.indexer_kl_loss(a, tgt, backend="triton"), (x,), (g,))
    (want,), (rdx,) = _grads(lambda a: ref.indexer_kl_loss(a, tgt), (x,), (g,))
    assert loss.dim() == 0 and loss.dtype == torch.float32 and dx.dtype == dtype
    torch.testing.assert_close(loss, want, **FP32)
    torch.testing.assert_close(dx, rdx, **tol(dtype))
    assert bool(torch.isfinite(dx).all()) and bool((dx[1, 1:3] == 0).all())


def test_kl_values_and_gradient_only_into_scores():
    x, tgt = _kl_inputs(torch.float32, seed=2)
    tgt = tgt.requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    loss = dsa.indexer_kl_loss(xs, tgt, backend="triton")
    loss.backward()
    assert tgt.grad is None and xs.grad is not None
    # Against torch's kl_div per live row, averaged over all B*S queries (kl_div forms 0 * -inf = NaN at
    # masked keys, so those are given a finite log-probability: their target is 0 and they add nothing).
    p = tgt.detach() / tgt.detach().sum(-1, keepdim=True).clamp_min(1e-30)
    live = tgt.detach().sum(-1) > 0
    log_q = torch.log_softmax(x[live], -1).masked_fill(p[live] == 0, 0.0)
    per_row = torch.nn.functional.kl_div(log_q, p[live], reduction="none").sum(-1)
    torch.testing.assert_close(loss, per_row.sum() / 10, **FP32)
    # The target equal to softmax(scores) (scaled: the op normalises) gives 0 loss and 0 gradient.
    x2 = _rand(2, 3, 9, seed=3).requires_grad_(True)
    zero = dsa.indexer_kl_loss(x2, torch.softmax(x2.detach(), -1) * 7, backend="triton")
    zero.backward()
    torch.testing.assert_close(zero, torch.zeros((), device=DEV), **FP32)
    torch.testing.assert_close(x2.grad, torch.zeros_like(x2), **FP32)


# --------------------------------------------------------------------------------------------------------
# Validation, backends, GPU


def test_errors_name_the_argument():
    f32, i32 = torch.float32, torch.int32
    q, k, w = _rand(1, 2, 3, 16), _rand(1, 4, 16), _rand(1, 2, 3)
    pos = torch.zeros(1, 2, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match=r"lightning_indexer: k_idx must have shape \[1, \*, 16\]"):
        dsa.lightning_indexer(q, _rand(1, 4, 8), w, q_positions=pos)
    with pytest.raises(TypeError, match=r"lightning_indexer: q_positions must be int64, got int32"):
        dsa.lightning_indexer(q, k, w, q_positions=pos.to(i32))
    with pytest.raises(ValueError, match=r"lightning_indexer: weights must have shape \[1, 2, 3\]"):
        dsa.lightning_indexer(q, k, w[..., :2], q_positions=pos)
    lengths = torch.ones(1, dtype=i32, device=DEV)
    with pytest.raises(ValueError, match=r"dsa_topk: k must be an int >= 1, got 0"):
        dsa.dsa_topk(_rand(1, 2, 4), 0, lengths=lengths)
    with pytest.raises(TypeError, match=r"dsa_topk: lengths must be int32, got int64"):
        dsa.dsa_topk(_rand(1, 2, 4), 2, lengths=lengths.long())
    qa, kv, cu = _rand(3, H, C), _rand(3, C), torch.tensor([0, 3], dtype=i32, device=DEV)
    idx = torch.zeros(3, 4, dtype=i32, device=DEV)
    with pytest.raises(TypeError, match=r"dsa_mla_prefill: idx must be int32, got int64"):
        dsa.dsa_mla_prefill(qa, kv, idx.long(), cu, softmax_scale=1.0, head_dim_v=L)
    with pytest.raises(ValueError, match=r"dsa_mla_prefill: kv must have shape \[3, 48\]"):
        dsa.dsa_mla_prefill(qa, kv[:, :40], idx, cu, softmax_scale=1.0, head_dim_v=L)
    with pytest.raises(ValueError, match=r"dsa_mla_prefill: head_dim_v must be an int in \(0, C=48\]"):
        dsa.dsa_mla_prefill(qa, kv, idx, cu, softmax_scale=1.0, head_dim_v=49)
    with pytest.raises(TypeError, match=r"dsa_mla_prefill: kv must be float32, got float16"):
        dsa.dsa_mla_prefill(qa, kv.half(), idx, cu, softmax_scale=1.0, head_dim_v=L)
    qd = _rand(2, 1, H, C)
    cache, table = _rand(3, 4, C), torch.zeros(2, 2, dtype=i32, device=DEV)
    seqlens = torch.ones(2, dtype=i32, device=DEV)
    with pytest.raises(ValueError, match=r"dsa_mla_decode: idx must have shape \[2, 1, \*\]"):
        dsa.dsa_mla_decode(qd, cache, table, seqlens, torch.zeros(2, 2, 4, dtype=i32, device=DEV), softmax_scale=1.0,
                           head_dim_v=L)
    with pytest.raises(ValueError, match=r"dsa_mla_decode: cache_seqlens must have shape \[2\]"):
        dsa.dsa_mla_decode(qd, cache, table, seqlens[:1], torch.zeros(2, 1, 4, dtype=i32, device=DEV),
                           softmax_scale=1.0, head_dim_v=L)
    with pytest.raises(ValueError, match=r"indexer_kl_loss: attn_probs_target must have shape \[1, 2, 4\]"):
        dsa.indexer_kl_loss(_rand(1, 2, 4), _rand(1, 2, 5))
    with pytest.raises(TypeError, match=r"indexer_kl_loss: index_scores must be float32 / float16 / bfloat16"):
        dsa.indexer_kl_loss(torch.zeros(1, 2, 4, dtype=i32, device=DEV), _rand(1, 2, 4, dtype=f32))


def test_auto_backend_and_empty_shapes():
    """On CPU tensors auto picks the reference (no C++ kernels here); empty inputs give empty / -1 / -inf."""
    from r1kernels.ops.sparse_dsa import DSA_MLA_DECODE, DSA_TOPK, INDEXER_KL_LOSS, LIGHTNING_INDEXER

    x = torch.zeros(1, 1, 4)
    lengths = torch.ones(1, dtype=torch.int32)
    assert DSA_TOPK.select("auto", x, 2, lengths)[0] == "reference"
    for op in (LIGHTNING_INDEXER, DSA_MLA_DECODE, INDEXER_KL_LOSS):
        assert op.select("auto", x)[0] == "reference"
    lengths = torch.ones(2, dtype=torch.int32, device=DEV)
    assert torch.equal(dsa.dsa_topk(_rand(2, 3, 0), 4, lengths=lengths, backend="triton"),
                       torch.full((2, 3, 4), -1, dtype=torch.int32, device=DEV))
    out, lse = triton_decode(_rand(2, 1, H, C), _rand(3, 4, C), torch.zeros(2, 2, dtype=torch.int32, device=DEV),
                             lengths, torch.zeros(2, 1, 0, dtype=torch.int32, device=DEV), SCALE, L)
    assert bool((out == 0).all()) and bool((lse == float("-inf")).all())


def test_import_does_not_import_triton():
    """The ops module loads the Triton kernels lazily, so registering it keeps `import r1kernels` triton-free."""
    code = "import sys, r1kernels.ops.sparse_dsa; assert 'triton' not in sys.modules, 'triton was imported'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.gpu
def test_bf16_on_gpu():
    """bf16 (not checkable under the interpreter) at V3 widths: C = 576, L = 512."""
    c, v, h, k = 576, 512, 16, 64
    bf = torch.bfloat16
    lens = [200, 77]
    tt = sum(lens)
    cu = torch.tensor([0, 200, 277], dtype=torch.int32, device=DEV)
    q, kv = _rand(tt, h, c, dtype=bf), _rand(tt, c, dtype=bf, seed=1)
    idx = _randint(-1, 200, (tt, k), seed=2)
    out, lse = dsa.dsa_mla_prefill(q, kv, idx, cu, softmax_scale=0.05, head_dim_v=v, backend="triton")
    rout, rlse = ref.dsa_mla_prefill(q, kv, idx, cu, softmax_scale=0.05, head_dim_v=v)
    torch.testing.assert_close(out, rout, **tol(bf))
    torch.testing.assert_close(lse, rlse, **tol(bf))
    qi, ki, w = _rand(2, 64, 8, 128, dtype=bf), _rand(2, 300, 128, dtype=bf, seed=1), _rand(2, 64, 8, seed=2)
    pos = torch.arange(236, 300, device=DEV)[None].expand(2, 64)
    scores = dsa.lightning_indexer(qi, ki, w, q_positions=pos, backend="triton")
    # fp32 scores of bf16 inputs: tensor cores need not add the fp32 products in IEEE order and rounding.
    torch.testing.assert_close(scores, ref.lightning_indexer(qi, ki, w, q_positions=pos), **tol(bf))
    lengths = torch.tensor([300, 250], dtype=torch.int32, device=DEV)
    assert torch.equal(dsa.dsa_topk(scores, 128, lengths=lengths, backend="triton"),
                       ref.dsa_topk(scores, 128, lengths=lengths))
