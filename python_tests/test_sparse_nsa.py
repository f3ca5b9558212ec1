"""Native Sparse Attention (the ``sparse`` family, NSA part): the Triton backend against the reference, forward
and backward, and the reference against a naive per-token loop.

Runs on the GPU when there is one, else under the Triton interpreter (conftest sets TRITON_INTERPRET); fp32
and fp16 everywhere, bf16 only on the GPU (the interpreter's bf16 tl.dot is wrong, DESIGN).

Expected values: the reference (fp32 math) on fp32 copies of the inputs, its gradients from torch autograd,
cast to the kernel's dtype. fp32 forward outputs, lse and block scores use the table's tolerance directly.
Gradients, and fp16 outputs, are sums over keys or queries of terms the kernel rounds to the input dtype
(p and dS before their dots): they are compared with ``assert_reduction_close`` against the sum of |terms| of
each element, computed densely in fp64 by ``_abs_sums`` from the same visible sets the reference uses.

Shapes are small (the interpreter runs every program in Python): the varlen batch of lengths 1, 17, 70, 129
with G = H / Hk in {1, 2, 4, 16}, D in {16, 32}; geometries with l' = 16 and d = 2 make the score kernel take
several steps per row.
"""
import math

import pytest
import torch
from conftest import assert_reduction_close, tol

import r1kernels
from r1kernels.ops import sparse as ops
from r1kernels.reference import mla_attention
from r1kernels.reference import sparse as ref

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERP_DTYPES = [torch.float32, torch.float16]
BF16_GPU = pytest.param(torch.bfloat16, marks=pytest.mark.gpu, id="bfloat16")  # the interpreter's bf16 dot is wrong
LENS = [1, 17, 70, 129]
DT_ID = lambda d: str(d).replace("torch.", "")  # noqa: E731


def _cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=DEV)


class Problem:
    """Random NSA inputs for sequences ``lens``: q [T, H, D], k / v [T, Hk, D / Dv], compressed k / v packed by
    ``cu_cmp`` for geometry (l, d), gates, and upstream gradients. All float tensors are leaves."""

    def __init__(self, lens, h, hk, d, dv, dtype=torch.float32, l=32, stride=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.lens, self.h, self.hk, self.d, self.dv, self.dtype = lens, h, hk, d, dv, dtype
        self.l, self.stride = l, stride
        self.cu = _cu(lens)
        self.cu_cmp = ref.compressed_cu_seqlens(self.cu, l, stride)
        t, tc = int(self.cu[-1]), int(self.cu_cmp[-1])

        def make(*s, scale=1.0):
            return (torch.randn(*s, generator=g) * scale).to(device=DEV, dtype=dtype).requires_grad_(True)

        self.q, self.k, self.v = make(t, h, d), make(t, hk, d), make(t, hk, dv)
        self.k_cmp, self.v_cmp = make(tc, hk, d), make(tc, hk, dv)
        self.gates = torch.rand(t, h, 3, generator=g).to(device=DEV, dtype=dtype).requires_grad_(True)
        self.do = torch.randn(t, h, dv, generator=g).to(device=DEV, dtype=dtype)
        self.dlse = (torch.randn(t, h, generator=g) * 0.5).to(DEV)
        self.scale = d ** -0.5

    @property
    def max_seqlen(self):
        return max(self.lens)


def _f32(*ts):
    return [t.detach().float().requires_grad_(True) for t in ts]


def _abs_sums(q, k, v, do, cu_q, cu_k, keep_fn, scale, dlse=None):
    """Per element of (out, dq, dk, dv), the sum of |terms| it is a sum of, in fp64: out = P V, dv = P^T dO,
    dq = scale dS K, dk = scale dS^T Q with |dS| <= P (|dO| |V|^T + |rowsum(dO * O)| + |dlse|).
    ``keep_fn(pos, n_keys, s0, s1)`` gives the visible set [n, Hk or 1, m] of queries at ``pos`` of a sequence."""
    q, k, v, do = (a.detach().double() for a in (q, k, v, do))
    h, hk = q.shape[1], k.shape[1]
    g = h // hk
    sums = [q.new_zeros(q.shape[0], h, v.shape[-1]), torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)]
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for s0, s1, c0, c1 in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
        n, m = s1 - s0, c1 - c0
        if n == 0:
            continue
        keep = keep_fn(torch.arange(n, device=q.device), m, s0, s1)
        keep = keep[:, None, :].expand(n, h, m) if keep.dim() == 2 else keep.repeat_interleave(g, 1)  # [n, H, m]
        kk = k[c0:c1].repeat_interleave(g, 1)  # [m, H, D]
        vv = v[c0:c1].repeat_interleave(g, 1)
        s = torch.einsum("nhd,mhd->nhm", q[s0:s1], kk) * scale
        s = s.masked_fill(~keep, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)  # rows that see nothing: 0
        o = torch.einsum("nhm,mhd->nhd", p, vv)
        dor = do[s0:s1]
        ds = p * (torch.einsum("nhd,mhd->nhm", dor.abs(), vv.abs()) + (dor * o).sum(-1, keepdim=True).abs()
                  + (0 if dlse is None else dlse[s0:s1].double().abs()[..., None]))
        sums[0][s0:s1] = torch.einsum("nhm,mhd->nhd", p, vv.abs())
        sums[1][s0:s1] = scale * torch.einsum("nhm,mhd->nhd", ds, kk.abs())
        dk = scale * torch.einsum("nhm,nhd->mhd", ds, q[s0:s1].abs())  # [m, H, D]: summed over each group's heads
        sums[2][c0:c1] = dk.reshape(m, hk, g, q.shape[-1]).sum(2)
        sums[3][c0:c1] = torch.einsum("nhm,nhd->mhd", p, dor.abs()).reshape(m, hk, g, v.shape[-1]).sum(2)
    return sums


def _assert_close_all(names, got, want, mags, dtype):
    for name, a, b, mag in zip(names, got, want, mags):
        assert a.dtype == dtype and a.shape == b.shape, name
        b = b.to(dtype)
        try:
            if name == "out" and dtype == torch.float32:
                torch.testing.assert_close(a, b, **tol(dtype))
            else:
                assert_reduction_close(a, b, mag, dtype)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


# ------------------------------------------------------------------------------------------------------
# The reference against a naive per-token loop


def _naive_nsa(p: Problem, l, d, lsel, n_sel, w, n_init, n_local):
    """NSA written token by token and head by head in fp64 with Python loops: the spec restated."""
    q, k, v, kc, vc, gates = (a.detach().double().cpu() for a in (p.q, p.k, p.v, p.k_cmp, p.v_cmp, p.gates))
    g = p.h // p.hk
    out = torch.zeros(q.shape[0], p.h, p.dv, dtype=torch.float64)

    def attend(qv, keys, vals):
        if len(keys) == 0:
            return torch.zeros(p.dv, dtype=torch.float64), None
        s = torch.stack([qv @ kk for kk in keys]) * p.scale
        pr = torch.softmax(s, 0)
        return sum(pi * vv for pi, vv in zip(pr, vals)), pr

    for b, (s0, s1) in enumerate(zip(p.cu[:-1].tolist(), p.cu[1:].tolist())):
        c0 = int(p.cu_cmp[b])
        n_cmp = int(p.cu_cmp[b + 1]) - c0
        for t in range(s1 - s0):
            vis = [i for i in range(n_cmp) if i * d + l - 1 <= t]
            cur = t // lsel
            for kh in range(p.hk):
                score = [0.0] * (cur + 1)
                heads = range(kh * g, kh * g + g)
                probs = {}
                for h in heads:
                    probs[h] = attend(q[s0 + t, h], [kc[c0 + i, kh] for i in vis], [vc[c0 + i, kh] for i in vis])
                    if probs[h][1] is not None:
                        for i, pi in zip(vis, probs[h][1]):
                            for j in range(cur + 1):
                                ov = min(i * d + l, (j + 1) * lsel) - max(i * d, j * lsel)
                                score[j] += float(pi) * max(ov, 0) / d
                forced = [j for j in range(cur + 1) if j < n_init or j > cur - n_local]
                rest = sorted((j for j in range(cur + 1) if j not in forced), key=lambda j: (-score[j], j))
                chosen = sorted((forced + rest)[:n_sel])
                sel_pos = [x for j in chosen for x in range(j * lsel, min((j + 1) * lsel, t + 1))]
                win_pos = list(range(max(0, t - w + 1), t + 1))
                for h in heads:
                    o_cmp = probs[h][0]
                    o_sel, _ = attend(q[s0 + t, h], [k[s0 + x, kh] for x in sel_pos], [v[s0 + x, kh] for x in sel_pos])
                    o_win, _ = attend(q[s0 + t, h], [k[s0 + x, kh] for x in win_pos], [v[s0 + x, kh] for x in win_pos])
                    gg = gates[s0 + t, h]
                    out[s0 + t, h] = gg[0] * o_cmp + gg[1] * o_sel + gg[2] * o_win
    return out


def test_reference_matches_naive_per_token_loop():
    # l = 8, d = 4, l' = 8: compressed tokens straddle block boundaries (weights 1, 2, 1 per block); n = 3 of up
    # to 5 blocks with 1 initial + 1 local forced; w = 6.
    p = Problem([5, 37], h=4, hk=2, d=16, dv=16, l=8, stride=4, seed=1)
    geo = dict(block_size=8, stride=4, select_block_size=8, num_selected=3, window=6, num_init=1, num_local=1)
    got = ref.nsa_attention(*_f32(p.q, p.k, p.v, p.k_cmp, p.v_cmp, p.gates), p.cu, p.cu_cmp, **geo)
    want = _naive_nsa(p, 8, 4, 8, 3, 6, 1, 1)
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-5, rtol=1e-5)


def test_overlap_weights_are_eq9():
    # l = 32, d = 16, l' = 64: block j gets compressed tokens 4j - 1 .. 4j + 3 with weights 1, 2, 2, 2, 1.
    w = ref.overlap_weights(12, 3, 32, 16, 64)
    assert w[:, 1].tolist() == [0, 0, 0, 1, 2, 2, 2, 1, 0, 0, 0, 0]
    assert w[:4, 0].tolist() == [2, 2, 2, 1]
    # every compressed token spreads its l / d = 2 strides over the blocks it covers
    assert torch.equal(w[:10].sum(1), torch.full((10,), 2.0))


# ------------------------------------------------------------------------------------------------------
# Compressed and sliding-window branches (the banded kernels)

G_CASES = [(4, 4), (4, 2), (4, 1), (16, 1)]  # (H, Hk): G = 1, 2, 4, 16


@pytest.mark.parametrize("dtype", INTERP_DTYPES + [BF16_GPU], ids=DT_ID)
@pytest.mark.parametrize("h,hk", G_CASES, ids=lambda x: str(x))
def test_compress_attention_matches_reference(h, hk, dtype):
    d, dv = (16, 32) if hk != 2 else (32, 16)
    p = Problem(LENS, h, hk, d, dv, dtype, seed=h + hk)
    o, lse = ops.nsa_compress_attention(p.q, p.k_cmp, p.v_cmp, p.cu, p.cu_cmp, block_size=p.l, stride=p.stride,
                                        backend="triton")
    assert lse.shape == (sum(LENS), h) and lse.dtype == torch.float32
    # queries before the first complete block see nothing: o = 0, lse = -inf, and no gradient flows from them
    dlse = torch.where(torch.isinf(lse.detach()), 0.0, p.dlse)
    grads = torch.autograd.grad([o, lse], [p.q, p.k_cmp, p.v_cmp], [p.do, dlse])
    leaves = _f32(p.q, p.k_cmp, p.v_cmp)
    ro, rl = ref.nsa_compress_attention(*leaves, p.cu, p.cu_cmp, block_size=p.l, stride=p.stride)
    rgrads = torch.autograd.grad([ro, rl], leaves, [p.do.float(), dlse])
    assert torch.equal(torch.isinf(lse), torch.isinf(rl)) and bool((o[torch.isinf(lse)] == 0).all())
    torch.testing.assert_close(lse[~torch.isinf(lse)], rl[~torch.isinf(rl)], **tol(torch.float32))
    mags = _abs_sums(p.q, p.k_cmp, p.v_cmp, p.do, p.cu, p.cu_cmp,
                     lambda pos, m, s0, s1: ref._cmp_visible(pos, m, p.l, p.stride), p.scale, dlse)
    _assert_close_all(("out", "dq", "dk_cmp", "dv_cmp"), [o, *grads], [ro, *rgrads], mags, dtype)


@pytest.mark.parametrize("dtype", INTERP_DTYPES + [BF16_GPU], ids=DT_ID)
@pytest.mark.parametrize("h,hk,window", [(4, 4, 1), (4, 2, 20), (4, 1, 64), (16, 1, 33)], ids=str)
def test_sliding_window_matches_reference(h, hk, window, dtype):
    p = Problem(LENS, h, hk, 32, 16, dtype, seed=window)
    o = ops.sliding_window_attention(p.q, p.k, p.v, p.cu, window=window, backend="triton")
    grads = torch.autograd.grad(o, [p.q, p.k, p.v], p.do)
    leaves = _f32(p.q, p.k, p.v)
    ro = ref.sliding_window_attention(*leaves, p.cu, window=window)
    rgrads = torch.autograd.grad(ro, leaves, p.do.float())
    mags = _abs_sums(p.q, p.k, p.v, p.do, p.cu, p.cu, lambda pos, m, s0, s1: ref._window_visible(pos, m, window),
                     p.scale)
    _assert_close_all(("out", "dq", "dk", "dv"), [o, *grads], [ro, *rgrads], mags, dtype)


# ------------------------------------------------------------------------------------------------------
# Block scores and top-n selection

# (l, d, l'): the defaults; l' = d (one compressed token per block start); d = 2 with l = 4 / 8 (many score steps
# per row, blocks reached by the carry of the step before, l - d > l'); l not a multiple of d.
GEOMETRIES = [(32, 16, 64), (32, 16, 16), (4, 2, 2), (8, 2, 4), (5, 2, 4)]


SCORE_CASES = ([(geo, torch.float32) for geo in GEOMETRIES] + [(geo, torch.float16) for geo in GEOMETRIES[1:3]]
               + [pytest.param(GEOMETRIES[0], torch.bfloat16, marks=pytest.mark.gpu)])


@pytest.mark.parametrize("geo,dtype", SCORE_CASES, ids=lambda x: DT_ID(x) if isinstance(x, torch.dtype) else str(x))
@pytest.mark.parametrize("h,hk", [(4, 2), (16, 1)], ids=str)
def test_block_scores_match_reference(h, hk, geo, dtype):
    l, d, lsel = geo
    p = Problem(LENS, h, hk, 16, 16, dtype, l=l, stride=d, seed=l + d)
    _, lse = ref.nsa_compress_attention(*_f32(p.q, p.k_cmp, p.v_cmp), p.cu, p.cu_cmp, block_size=l, stride=d)
    kw = dict(block_size=l, stride=d, select_block_size=lsel, max_seqlen=p.max_seqlen)
    got = ops.nsa_block_scores(p.q, p.k_cmp, lse, p.cu, p.cu_cmp, backend="triton", **kw)
    want = ref.nsa_block_scores(p.q.detach().float(), p.k_cmp.detach().float(), lse, p.cu, p.cu_cmp, **kw)
    assert got.shape == (sum(LENS), hk, math.ceil(max(LENS) / lsel)) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **tol(torch.float32))
    # a query's compressed probabilities add up to 1 per head and each token spreads l / d over the blocks:
    # its scores add up to G l / d, or 0 when it sees no compressed token
    sees = torch.isfinite(lse).view(-1, hk, h // hk)[..., 0]
    torch.testing.assert_close(got.sum(-1), torch.where(sees, h // hk * l / d, 0.0), **tol(torch.float32))
    assert not got.requires_grad


@pytest.mark.parametrize("n,init,local,lsel", [(16, 1, 2, 64), (3, 1, 2, 8), (2, 2, 3, 8), (5, 0, 0, 4), (40, 1, 2, 4)],
                         ids=str)
def test_topk_matches_reference_with_ties(n, init, local, lsel):
    g = torch.Generator().manual_seed(n)
    t, hk = sum(LENS), 2
    nb = math.ceil(max(LENS) / lsel)
    # few distinct values (many ties, broken towards the lower block), some -inf
    scores = torch.randint(0, 4, (t, hk, nb), generator=g).float()
    scores[torch.rand(t, hk, nb, generator=g) < 0.1] = float("-inf")
    scores = scores.to(DEV)
    cu = _cu(LENS)
    kw = dict(num_selected=n, select_block_size=lsel, num_init=init, num_local=local)
    got = ops.nsa_topk_blocks(scores, cu, backend="triton", **kw)
    want = ref.nsa_topk_blocks(scores, cu, **kw)
    assert got.dtype == torch.int32 and got.shape == (t, hk, n)
    assert torch.equal(got, want)
    # ascending, -1 padding last, every block causal, forced blocks present when the budget allows them
    pos = torch.cat([torch.arange(x) for x in LENS]).to(DEV)
    valid = got >= 0
    assert bool((got[..., 1:][valid[..., 1:]] > got[..., :-1][valid[..., 1:]]).all())
    assert bool((valid[..., :-1] | ~valid[..., 1:]).all())
    assert bool((got <= (pos // lsel)[:, None, None]).all())
    if n >= init + local:
        cur = (pos // lsel)[:, None]
        for j in range(init):
            assert bool(((got == j).any(-1) | (cur < j)).all())
        for back in range(local):
            assert bool(((got == (cur - back)[..., None]).any(-1) | (cur < back)).all())


# ------------------------------------------------------------------------------------------------------
# Selected-block branch


def _selection(p: Problem, n, lsel, seed=0):
    """Blocks to attend: top-n of random scores (so the test does not depend on the score kernel)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(sum(p.lens), p.hk, math.ceil(max(p.lens) / lsel), generator=g).to(DEV)
    return ref.nsa_topk_blocks(scores, p.cu, num_selected=n, select_block_size=lsel)


def _check_selected(p: Problem, block_idx, lsel, dtype):
    o = ops.nsa_selected_attention(p.q, p.k, p.v, block_idx, p.cu, select_block_size=lsel, backend="triton")
    grads = torch.autograd.grad(o, [p.q, p.k, p.v], p.do)
    leaves = _f32(p.q, p.k, p.v)
    ro = ref.nsa_selected_attention(*leaves, block_idx, p.cu, select_block_size=lsel)
    rgrads = torch.autograd.grad(ro, leaves, p.do.float())
    mags = _abs_sums(p.q, p.k, p.v, p.do, p.cu, p.cu,
                     lambda pos, m, s0, s1: ref._selected_visible(pos, block_idx[s0:s1], m, lsel), p.scale)
    _assert_close_all(("out", "dq", "dk", "dv"), [o, *grads], [ro, *rgrads], mags, dtype)
    return o, grads


# (H, Hk, n, l', dtype): G = 1, 2, 4, 16 in fp32, G = 1 and 16 in fp16
SELECTED_CASES = [(2, 2, 3, 16, torch.float32), (2, 1, 4, 16, torch.float32), (4, 1, 2, 32, torch.float32),
                  (16, 1, 3, 16, torch.float32), (2, 2, 3, 16, torch.float16), (16, 1, 2, 32, torch.float16),
                  pytest.param(16, 1, 3, 16, torch.bfloat16, marks=pytest.mark.gpu),
                  pytest.param(2, 2, 3, 16, torch.bfloat16, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("h,hk,n,lsel,dtype", SELECTED_CASES,
                         ids=lambda x: DT_ID(x) if isinstance(x, torch.dtype) else str(x))
def test_selected_attention_matches_reference(h, hk, n, lsel, dtype):
    # one program per (token, KV head) runs in Python under the interpreter: the full varlen batch once (G = 16),
    # the other cases on its first three sequences
    lens = LENS if (h, dtype) == (16, torch.float32) or DEV.type == "cuda" else [1, 17, 70]
    p = Problem(lens, h, hk, 16, 32, dtype, seed=h * n)
    _check_selected(p, _selection(p, n, lsel, seed=h), lsel, dtype)


def test_selected_attention_unsorted_padded_indices():
    # Any order, -1 anywhere, blocks wholly in a query's future: the same as the reference's union.
    p = Problem([40, 33], 4, 2, 16, 16, seed=3)
    g = torch.Generator().manual_seed(0)
    # 3 distinct values of -1 .. 4 per row, in random order; blocks 3 and 4 lie past the second sequence
    idx = torch.argsort(torch.rand(p.q.shape[0], 2, 6, generator=g), -1)[..., :3] - 1
    _check_selected(p, idx.to(DEV, torch.int64), 16, torch.float32)


def test_selected_backward_many_chunks_is_deterministic():
    # Cut every block's query list into chunks of one step (the default keeps small inputs in one chunk), so the
    # partial sums of many chunks are added: same gradients as one chunk, and the same bits on every run.
    from r1kernels.triton.sparse import selected_bwd, selected_fwd, token_positions

    p = Problem([70, 20], 2, 1, 16, 16, seed=5)
    idx = _selection(p, 3, 16, seed=5)
    q, k, v, do = (a.detach() for a in (p.q, p.k, p.v, p.do))
    _, pos, kstart = token_positions(p.cu, q.shape[0])
    o, lse = selected_fwd(q, k, v, idx, pos, kstart, 16, p.scale)
    small = [selected_bwd(do, q, k, v, o, lse, idx, p.cu, 16, p.scale, chunk=32) for _ in range(2)]
    whole = selected_bwd(do, q, k, v, o, lse, idx, p.cu, 16, p.scale)
    assert all(torch.equal(a, b) for a, b in zip(*small))
    for a, b in zip(small[0], whole):
        torch.testing.assert_close(a, b, **tol(torch.float32))


# ------------------------------------------------------------------------------------------------------
# Short sequences: selected and window branches are dense causal attention


def test_short_sequences_give_dense_causal_attention():
    # n l' >= len and w >= len: every causal block is selected, the window covers the whole past.
    lens = [1, 17, 50]
    p = Problem(lens, 4, 2, 16, 16, seed=7)
    n, lsel, w = 4, 16, 50
    q, k, v = (a.detach() for a in (p.q, p.k, p.v))
    dense = mla_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), p.cu, max(lens),
                          softmax_scale=p.scale, causal=True)
    scores = torch.rand(q.shape[0], 2, 4, device=DEV)
    for backend in ("reference", "triton"):
        idx = ops.nsa_topk_blocks(scores, p.cu, num_selected=n, select_block_size=lsel, backend=backend)
        o_sel = ops.nsa_selected_attention(q, k, v, idx, p.cu, select_block_size=lsel, backend=backend)
        o_win = ops.sliding_window_attention(q, k, v, p.cu, window=w, backend=backend)
        torch.testing.assert_close(o_sel, dense, **tol(torch.float32))
        torch.testing.assert_close(o_win, dense, **tol(torch.float32))


# ------------------------------------------------------------------------------------------------------
# The whole NSA attention and the decode step

NSA_GEO = dict(block_size=8, stride=4, select_block_size=16, num_selected=3, window=20, num_init=1, num_local=2)


def _nsa_abs_sums(p: Problem, geo: dict) -> dict:
    """Sums of |terms| (fp64) of every output of nsa_attention: each branch's (_abs_sums, with the upstream
    gradient scaled by that branch's gate) added up; out = sum_b g_b o_b with |o_b| <= P_b |V|, and
    dgates_b = sum over Dv of dO o_b, bounded by |dO| P_b |V|. The blocks are the reference's selection."""
    l, d, lsel = geo["block_size"], geo["stride"], geo["select_block_size"]
    q, k, kc = (a.detach().float() for a in (p.q, p.k, p.k_cmp))
    _, lse = ref.nsa_compress_attention(q, kc, p.v_cmp.detach().float(), p.cu, p.cu_cmp, block_size=l, stride=d)
    scores = ref.nsa_block_scores(q, kc, lse, p.cu, p.cu_cmp, block_size=l, stride=d, select_block_size=lsel)
    idx = ref.nsa_topk_blocks(scores, p.cu, num_selected=geo["num_selected"], select_block_size=lsel,
                              num_init=geo["num_init"], num_local=geo["num_local"])
    g = p.gates.detach().double()
    do = p.do.double()
    keeps = (lambda pos, m, s0, s1: ref._cmp_visible(pos, m, l, d),
             lambda pos, m, s0, s1: ref._selected_visible(pos, idx[s0:s1], m, lsel),
             lambda pos, m, s0, s1: ref._window_visible(pos, m, geo["window"]))
    kvs = ((p.k_cmp, p.v_cmp, p.cu_cmp), (p.k, p.v, p.cu), (p.k, p.v, p.cu))
    parts = [_abs_sums(p.q, kk, vv, do * g[..., b:b + 1], p.cu, cu_k, keep, p.scale)
             for b, ((kk, vv, cu_k), keep) in enumerate(zip(kvs, keeps))]
    out = sum(g[..., b:b + 1].abs() * parts[b][0] for b in range(3))
    dgates = torch.stack([(do.abs() * parts[b][0]).sum(-1) for b in range(3)], -1)
    return dict(out=out, dq=parts[0][1] + parts[1][1] + parts[2][1], dk=parts[1][2] + parts[2][2],
                dv=parts[1][3] + parts[2][3], dk_cmp=parts[0][2], dv_cmp=parts[0][3], dgates=dgates)



@pytest.mark.parametrize("h,hk,dtype", [(4, 2, torch.float32), (16, 1, torch.float32), (4, 1, torch.float16),
                                        pytest.param(16, 1, torch.bfloat16, marks=pytest.mark.gpu)],
                         ids=lambda x: DT_ID(x) if isinstance(x, torch.dtype) else str(x))
def test_nsa_attention_matches_reference(h, hk, dtype):
    p = Problem([1, 17, 70] if dtype == torch.float32 else [17, 45], h, hk, 16, 16, dtype, l=8, stride=4, seed=11)
    ins = [p.q, p.k, p.v, p.k_cmp, p.v_cmp, p.gates]
    o = ops.nsa_attention(*ins, p.cu, p.cu_cmp, backend="triton", **NSA_GEO)
    grads = torch.autograd.grad(o, ins, p.do)
    leaves = _f32(*ins)
    ro = ref.nsa_attention(*leaves, p.cu, p.cu_cmp, **NSA_GEO)
    rgrads = torch.autograd.grad(ro, leaves, p.do.float())
    assert o.dtype == dtype and [gr.dtype for gr in grads] == [dtype] * 6
    mags = _nsa_abs_sums(p, NSA_GEO)
    names = ("out", "dq", "dk", "dv", "dk_cmp", "dv_cmp", "dgates")
    _assert_close_all(names, [o, *grads], [ro, *rgrads], [mags[n] for n in names], dtype)


def _decode_problem(lens, h, hk, d, dv, dtype, geo, smax, seed=0, poison=True):
    """Caches for sequences ``lens`` ([B, Smax] rows, rows past each length NaN when ``poison``), the packed
    prefill inputs holding the same values, and the decode queries = the prefill's last queries."""
    p = Problem(lens, h, hk, d, dv, dtype, l=geo["block_size"], stride=geo["stride"], seed=seed)
    b = len(lens)
    cmax = max(1, max(int(x) for x in (p.cu_cmp[1:] - p.cu_cmp[:-1]).tolist()) + 2)
    fill = float("nan") if poison else 0.0
    caches = [torch.full((b, n, hk, w), fill, dtype=dtype, device=DEV)
              for n, w in ((smax, d), (smax, dv), (cmax, d), (cmax, dv))]
    for i, (s0, s1) in enumerate(zip(p.cu[:-1].tolist(), p.cu[1:].tolist())):
        c0, c1 = int(p.cu_cmp[i]), int(p.cu_cmp[i + 1])
        caches[0][i, :s1 - s0] = p.k.detach()[s0:s1]
        caches[1][i, :s1 - s0] = p.v.detach()[s0:s1]
        caches[2][i, :c1 - c0] = p.k_cmp.detach()[c0:c1]
        caches[3][i, :c1 - c0] = p.v_cmp.detach()[c0:c1]
    last = p.cu[1:].long() - 1
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    cmp_lens = (p.cu_cmp[1:] - p.cu_cmp[:-1]).to(torch.int32)
    return p, caches, seqlens, cmp_lens, p.q.detach()[last], p.gates.detach()[last], last


@pytest.mark.parametrize("dtype", INTERP_DTYPES + [BF16_GPU], ids=DT_ID)
@pytest.mark.parametrize("h,hk", [(4, 2), (16, 1)], ids=str)
def test_decode_matches_reference_and_prefill_last_rows(h, hk, dtype):
    lens = [1, 17, 70, 129]
    p, caches, seqlens, cmp_lens, q, gates, last = _decode_problem(lens, h, hk, 16, 32, dtype, NSA_GEO, 140, seed=h)
    args = (q, *caches, seqlens, cmp_lens, gates)
    o = ops.nsa_decode(*args, backend="triton", **NSA_GEO)
    ro = ops.nsa_decode(*args, backend="reference", **NSA_GEO)
    assert o.shape == (len(lens), h, 32) and o.dtype == dtype
    assert torch.isfinite(o).all() and torch.isfinite(ro).all()  # the NaN past each length never leaks
    # the decode step is the last row of the prefill, on both backends: the reference's decode and prefill
    # compute the same fp32 values (up to summation order) and round each branch and the sum once
    prefill = ref.nsa_attention(*(a.detach() for a in (p.q, p.k, p.v, p.k_cmp, p.v_cmp, p.gates)), p.cu, p.cu_cmp,
                                **NSA_GEO)[last]
    torch.testing.assert_close(ro, prefill, **tol(dtype))
    mag = _nsa_abs_sums(p, NSA_GEO)["out"][last]
    _assert_close_all(("out",), [o], [ro], [mag], dtype)


def test_decode_reads_only_valid_rows():
    # Poisoned (NaN) rows past seqlens / cmp_lens, in a cache that is a slice of a larger one (batch stride a
    # multiple of the token stride): the same output as clean caches.
    lens = [40, 1, 100]
    p, caches, seqlens, cmp_lens, q, gates, _ = _decode_problem(lens, 4, 2, 16, 16, torch.float32, NSA_GEO, 112, seed=2)
    clean = [torch.nan_to_num(c, nan=0.0) for c in caches]
    wide = [torch.full((c.shape[0], c.shape[1] + 9, c.shape[2], c.shape[3] + 16), float("nan"), device=DEV)
            for c in caches]
    for wd, c in zip(wide, caches):
        wd[:, :c.shape[1], :, :c.shape[3]] = c
    sliced = [wd[:, :c.shape[1], :, :c.shape[3]] for wd, c in zip(wide, caches)]
    outs = [ops.nsa_decode(q, *cs, seqlens, cmp_lens, gates, backend="triton", **NSA_GEO) for cs in (caches, sliced)]
    want = ops.nsa_decode(q, *clean, seqlens, cmp_lens, gates, backend="triton", **NSA_GEO)
    for o in outs:
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, want, **tol(torch.float32))


def test_non_contiguous_inputs():
    # q a column slice of a wider tensor, k / v slices of one fused [T, Hk, D + Dv] projection, k_cmp / v_cmp
    # transposed storage: the kernels take any strides.
    p = Problem([9, 40], 4, 2, 16, 16, l=8, stride=4, seed=8)
    t, tc = p.q.shape[0], p.k_cmp.shape[0]
    wide_q = torch.cat([p.q.detach(), torch.randn(t, 4, 8, device=DEV)], -1)
    kv = torch.cat([p.k.detach(), p.v.detach()], -1)
    kc_t = p.k_cmp.detach().permute(2, 1, 0).contiguous().permute(2, 1, 0)
    vc_t = p.v_cmp.detach().permute(2, 1, 0).contiguous().permute(2, 1, 0)
    args = (wide_q[..., :16], kv[..., :16], kv[..., 16:], kc_t, vc_t, p.gates.detach(), p.cu, p.cu_cmp)
    assert not any(a.is_contiguous() for a in args[:5]) and tc > 0
    o = ops.nsa_attention(*args, backend="triton", **NSA_GEO)
    ro = ref.nsa_attention(*(a.detach() for a in (p.q, p.k, p.v, p.k_cmp, p.v_cmp, p.gates)), p.cu, p.cu_cmp,
                           **NSA_GEO)
    torch.testing.assert_close(o, ro, **tol(torch.float32))


def test_empty_sequences():
    # B = 3 with an empty middle sequence: nothing written there, neighbours unaffected.
    p = Problem([20, 0, 37], 4, 2, 16, 16, l=8, stride=4, seed=4)
    ins = [p.q, p.k, p.v, p.k_cmp, p.v_cmp, p.gates]
    o = ops.nsa_attention(*ins, p.cu, p.cu_cmp, backend="triton", **NSA_GEO)
    ro = ref.nsa_attention(*(a.detach() for a in ins), p.cu, p.cu_cmp, **NSA_GEO)
    torch.testing.assert_close(o, ro, **tol(torch.float32))


# ------------------------------------------------------------------------------------------------------
# Dispatch and validation


def test_auto_backend_on_cpu_is_the_reference():
    p = Problem([9, 40], 4, 2, 16, 16, l=8, stride=4, seed=6)
    args = (p.q, p.k, p.v, p.k_cmp, p.v_cmp, p.gates, p.cu, p.cu_cmp, *NSA_GEO.values(), p.scale, 40)
    if DEV.type == "cpu":
        assert ops.NSA_ATTENTION.select("auto", *args)[0] == "reference"
    assert ops.NSA_ATTENTION.select("triton", *args)[0] == "triton"
    assert {op.name for op in ops.SPARSE_NSA_OPS} >= {"nsa_attention", "nsa_decode", "nsa_topk_blocks"}


def test_errors_name_the_argument():
    p = Problem([9, 40], 4, 2, 16, 16, l=8, stride=4)
    q, k, v = (a.detach() for a in (p.q, p.k, p.v))
    idx = torch.zeros(49, 3, 1, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match=r"nsa_selected_attention: the query heads H = 4 must be a multiple of k's KV"):
        ops.nsa_selected_attention(q, k[:, :1].repeat(1, 3, 1), v[:, :1].repeat(1, 3, 1), idx, p.cu)
    with pytest.raises(ValueError, match=r"sliding_window_attention: window must be an int >= 1"):
        ops.sliding_window_attention(q, k, v, p.cu, window=0)
    with pytest.raises(TypeError, match=r"nsa_compress_attention: cu_seqlens must be int32"):
        ops.nsa_compress_attention(q, p.k_cmp.detach(), p.v_cmp.detach(), p.cu.long(), p.cu_cmp)
    with pytest.raises(ValueError, match=r"nsa_attention: gates must have shape \[49, 4, 3\]"):
        ops.nsa_attention(q, k, v, p.k_cmp.detach(), p.v_cmp.detach(), p.gates.detach()[:, :, :2], p.cu, p.cu_cmp)
    with pytest.raises(TypeError, match=r"nsa_selected_attention: k must be float16"):
        ops.nsa_selected_attention(q.half(), k, v, torch.zeros(49, 2, 1, dtype=torch.int32, device=DEV), p.cu)
    with pytest.raises(r1kernels.BackendUnavailable, match="l' a multiple of d"):
        ops.nsa_attention(q, k, v, p.k_cmp.detach(), p.v_cmp.detach(), p.gates.detach(), p.cu, p.cu_cmp,
                          block_size=8, stride=4, select_block_size=12, backend="triton")


# ------------------------------------------------------------------------------------------------------
# bf16 on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("h,hk", [(16, 1), (64, 4)], ids=str)
def test_bf16_nsa_on_gpu(h, hk):
    # V3-like widths with the paper's geometry. Every sequence fits the n l' = 1024 selection budget, so both
    # sides select every causal block: bf16 scores that nearly tie cannot pick different blocks on the two
    # sides (partial selection is checked on exact inputs by the top-n and selected-branch tests).
    p = Problem([1, 300, 1000, 77], h, hk, 128, 128, torch.bfloat16, seed=13)
    ins = [p.q, p.k, p.v, p.k_cmp, p.v_cmp, p.gates]
    geo = dict(window=128)
    o = ops.nsa_attention(*ins, p.cu, p.cu_cmp, backend="triton", **geo)
    grads = torch.autograd.grad(o, ins, p.do)
    leaves = _f32(*ins)
    ro = ref.nsa_attention(*leaves, p.cu, p.cu_cmp, **geo)
    rgrads = torch.autograd.grad(ro, leaves, p.do.float())
    assert torch.isfinite(o).all() and all(torch.isfinite(gr).all() for gr in grads)
    mags = _nsa_abs_sums(p, dict(ref_defaults(), **geo))
    names = ("out", "dq", "dk", "dv", "dk_cmp", "dv_cmp", "dgates")
    _assert_close_all(names, [o, *grads], [ro, *rgrads], [mags[n] for n in names], torch.bfloat16)


@pytest.mark.gpu
def test_bf16_decode_on_gpu():
    lens = [1, 700, 2000]
    geo = dict(block_size=32, stride=16, select_block_size=64, num_selected=16, window=512, num_init=1, num_local=2)
    p, caches, seqlens, cmp_lens, q, gates, last = _decode_problem(lens, 64, 4, 128, 128, torch.bfloat16, geo, 2048)
    o = ops.nsa_decode(q, *caches, seqlens, cmp_lens, gates, backend="triton", **geo)
    ro = ops.nsa_decode(q.float(), *(c.float() for c in caches), seqlens, cmp_lens, gates.float(),
                        backend="reference", **geo)
    assert torch.isfinite(o).all()
    _assert_close_all(("out",), [o], [ro], [_nsa_abs_sums(p, geo)["out"][last]], torch.bfloat16)


def ref_defaults() -> dict:
    return dict(block_size=ref.BLOCK_SIZE, stride=ref.STRIDE, select_block_size=ref.SELECT_BLOCK_SIZE,
                num_selected=ref.NUM_SELECTED, window=ref.WINDOW, num_init=ref.NUM_INIT, num_local=ref.NUM_LOCAL)
