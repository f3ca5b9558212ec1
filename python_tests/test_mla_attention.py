"""Packed varlen MLA attention: the Triton flash-attention backend against torch autograd through
``reference.mla_attention`` (forward, lse, and dq / dk / dv, including the gradient of lse).

Runs on the GPU when there is one, else under the Triton interpreter (conftest sets TRITON_INTERPRET);
fp32 and fp16 everywhere, bf16 only on the GPU (the interpreter's bf16 tl.dot is wrong, DESIGN).

Expected values: the reference (which computes in fp32) run on fp32 copies of the inputs, its gradients
from torch autograd, cast to the kernel's dtype. out (fp32) and lse (always fp32) are compared with the
table's tolerance directly. Gradients, and fp16 outputs, are sums over a sequence's keys or queries of
terms the kernel rounds to the input dtype (p and dS before their dots): they are compared with
``assert_reduction_close`` against the sum of |terms| of each element, computed densely in fp64 by
``_abs_sums``.
"""
import pytest
import torch
from conftest import assert_reduction_close, tol

import r1kernels
from r1kernels import ops, reference

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERP_DTYPES = [torch.float32, torch.float16]


def _cu(lens):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=DEV)


def _problem(lens, h, dqk, dv, dtype=torch.float32, seed=0):
    """q, k, v leaves (requiring grad), cu_seqlens, and random dout / dlse."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    make = lambda *s: torch.randn(*s, generator=g).to(device=DEV, dtype=dtype)  # noqa: E731
    q, k, v = make(t, h, dqk), make(t, h, dqk), make(t, h, dv)
    dout = make(t, h, dv)
    dlse = (torch.randn(h, t, generator=g) * 0.5).to(DEV)
    return [a.requires_grad_(True) for a in (q, k, v)], _cu(lens), dout, dlse


def _triton(q, k, v, cu, max_seqlen, scale, causal, dout, dlse, backend="triton"):
    out, lse = ops.mla_attention(q, k, v, cu, max_seqlen, softmax_scale=scale, causal=causal, return_lse=True,
                                 backend=backend)
    grads = torch.autograd.grad([out, lse], [q, k, v], [dout, dlse])
    return out, lse, grads


def _reference(q, k, v, cu, max_seqlen, scale, causal, dout, dlse):
    leaves = [a.detach().float().requires_grad_(True) for a in (q, k, v)]
    out, lse = reference.mla_attention(*leaves, cu, max_seqlen, softmax_scale=scale, causal=causal, return_lse=True)
    grads = torch.autograd.grad([out, lse], leaves, [dout.float(), dlse])
    return out, lse, grads


def _abs_sums(q, k, v, cu, scale, causal, dout, dlse):
    """Per output element, the sum of |terms| it is a sum of: out = P V, dv = P^T dO,
    dq = scale dS K, dk = scale dS^T Q with |dS| <= P (|dO| |V|^T + rowsum |dO * O| + |dlse|)."""
    q, k, v, dout = (a.detach().double() for a in (q, k, v, dout))
    dlse = dlse.double()
    sums = [torch.zeros_like(v), torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)]
    bounds = cu.tolist()
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        n = s1 - s0
        if n == 0:
            continue
        qs, ks, vs, dos = (a[s0:s1].transpose(0, 1) for a in (q, k, v, dout))  # [H, n, D]
        s = scale * qs @ ks.transpose(1, 2)
        if causal:
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        p = s.softmax(-1)
        o = p @ vs
        ds = p * (dos.abs() @ vs.abs().transpose(1, 2) + (dos * o).abs().sum(-1, keepdim=True)
                  + dlse[:, s0:s1, None].abs())
        for i, val in enumerate((p @ vs.abs(), scale * ds @ ks.abs(), scale * ds.transpose(1, 2) @ qs.abs(),
                                 p.transpose(1, 2) @ dos.abs())):
            sums[i][s0:s1] = val.transpose(0, 1)
    return sums


def assert_matches_reference(q, k, v, cu, max_seqlen, causal, dout, dlse, scale=None, backend="triton"):
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse, grads = _triton(q, k, v, cu, max_seqlen, scale, causal, dout, dlse, backend)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, cu, max_seqlen, scale, causal, dout, dlse)
    mags = _abs_sums(q, k, v, cu, scale, causal, dout, dlse)

    assert out.dtype == dtype and out.shape == v.shape and lse.dtype == torch.float32
    assert [g.dtype for g in grads] == [dtype] * 3
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(lse, ref_lse, **tol(torch.float32))
    names = ("out", "dq", "dk", "dv")
    for name, got, want, mag in zip(names, [out, *grads], [ref_out, *ref_grads], mags):
        want = want.to(dtype)
        try:
            if name == "out" and dtype == torch.float32:
                torch.testing.assert_close(got, want, **tol(dtype))
            else:
                assert_reduction_close(got, want, mag, dtype)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    return out, lse, grads


# Lengths 1, 17, 129 and varlen batches with an empty sequence; Dqk/Dv = V3's (192, 128) at short lengths,
# (48, 32) (Dqk = 32 + 16), (16, 16), and (112, 48) (Dqk = 64 + 48: a masked remainder tile; Dv padded to 64).
CASES = {
    "n1-192-128": ([1], 2, 192, 128),
    "n17-192-128": ([17], 2, 192, 128),
    "varlen-192-128": ([3, 0, 20], 2, 192, 128),
    "n129-48-32": ([129], 2, 48, 32),
    "varlen-48-32": ([5, 0, 17, 1, 40, 0], 3, 48, 32),
    "varlen-16-16": ([0, 17, 33], 2, 16, 16),
    "varlen-112-48": ([20, 9, 0], 2, 112, 48),
}


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_match_reference(case, causal, dtype):
    lens, h, dqk, dv = CASES[case]
    (q, k, v), cu, dout, dlse = _problem(lens, h, dqk, dv, dtype, seed=len(case) + 2 * causal)
    assert_matches_reference(q, k, v, cu, max(lens), causal, dout, dlse)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_backend_matches_reference(case, causal):
    """The padded-batch SDPA backend (CPU tensors, fp32), with and without lse."""
    lens, h, dqk, dv = CASES[case]
    (q, k, v), cu, dout, dlse = _problem(lens, h, dqk, dv, torch.float32, seed=len(case) + 2 * causal)
    q, k, v, dout, dlse, cu = (x.detach().cpu() for x in (q, k, v, dout, dlse, cu))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    assert_matches_reference(q, k, v, cu, max(lens) + 3, causal, dout, dlse, backend="cpu")
    out = ops.mla_attention(q, k, v, cu, max(lens), softmax_scale=0.3, causal=causal, backend="cpu")
    want = reference.mla_attention(q, k, v, cu, max(lens), softmax_scale=0.3, causal=causal)
    torch.testing.assert_close(out, want, **tol(torch.float32))


# A long sequence (several query / key tiles each side of the diagonal), alone and with short neighbours;
# small dims keep the interpreter fast.
@pytest.mark.parametrize("lens,causal,dtype", [
    ([1000], True, torch.float32),
    ([7, 0, 1000], False, torch.float32),
    ([1000, 3], True, torch.float16),
], ids=["1000-causal-fp32", "varlen-1000-full-fp32", "1000-causal-fp16"])
def test_long_sequence(lens, causal, dtype):
    (q, k, v), cu, dout, dlse = _problem(lens, 1, 32, 16, dtype, seed=3)
    assert_matches_reference(q, k, v, cu, max(lens), causal, dout, dlse)


# The interpreter's launch config uses square tiles; the GPU's are not (BM 128 / BN 32..64 forward, BM 32..64 /
# BN 64 backward), which moves the diagonal and tail tiles. The same kernels with those shapes, here.
@pytest.mark.parametrize("bm,bn", [(64, 16), (16, 64), (32, 64), (128, 32)], ids=lambda v: str(v))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_rectangular_tiles(bm, bn, causal, monkeypatch):
    from r1kernels.triton import mla as tmla

    monkeypatch.setattr(tmla, "_config", lambda *args, **kw: dict(BM=bm, BN=bn, opts={}))
    lens = [1, 17, 100, 0, 129, 64]
    (q, k, v), cu, dout, dlse = _problem(lens, 1, 48, 32, seed=bm + bn)
    assert_matches_reference(q, k, v, cu, max(lens), causal, dout, dlse)


def test_max_seqlen_larger_than_needed_and_custom_scale():
    # max_seqlen only sizes the grid: a generous bound gives the same result (extra programs exit)
    (q, k, v), cu, dout, dlse = _problem([17, 5], 2, 48, 32, seed=4)
    out, lse, grads = assert_matches_reference(q, k, v, cu, 200, True, dout, dlse, scale=0.37)
    out2, lse2, grads2 = _triton(q, k, v, cu, 17, 0.37, True, dout, dlse)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_non_contiguous_inputs_as_the_mla_module_builds_them(dtype):
    g = torch.Generator().manual_seed(5)
    lens, h, dn, r, dv = [17, 0, 9], 2, 32, 16, 32
    t = sum(lens)
    make = lambda *s: torch.randn(*s, generator=g).to(device=DEV, dtype=dtype).requires_grad_(True)  # noqa: E731
    q_wide = make(t, h, dn + r + 8)
    q = q_wide[:, :, 4:4 + dn + r]  # a slice of a wider tensor: row stride H * (Dqk + 8)
    kv = make(t, h, dn + dv)  # kv_b_proj's output per head, split into k_nope and v as the module does
    k_nope, v = kv.split([dn, dv], dim=-1)
    k_pe = make(t, 1, r)  # one rotary key per token, expanded over the heads
    k = torch.cat([k_nope, k_pe.expand(t, h, r)], dim=-1)
    dout = torch.randn(dv, h, t, generator=g).to(device=DEV, dtype=dtype).permute(2, 1, 0)  # column stride H * T
    dlse = torch.randn(t, h, generator=g).to(DEV).t()  # [H, T] with row stride 1
    assert not (q.is_contiguous() or v.is_contiguous() or dout.is_contiguous() or dlse.is_contiguous())
    cu = _cu(lens)
    assert_matches_reference(q, k, v, cu, 17, True, dout, dlse)
    # head-major k (token stride Dqk, head stride T * Dqk) and a last dim with stride 2
    k_hm = k.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    q_s2 = torch.randn(t, h, 2 * (dn + r), generator=g).to(device=DEV, dtype=dtype).requires_grad_(True)[:, :, ::2]
    assert_matches_reference(q_s2, k_hm, v, cu, 17, False, dout, dlse)


def test_without_lse_and_only_some_grads():
    (q, k, v), cu, dout, dlse = _problem([17, 4], 2, 48, 32, seed=6)
    ref_out, _, ref_grads = _reference(q, k, v, cu, 17, 0.2, True, dout, torch.zeros_like(dlse))
    k_frozen = k.detach()
    out = ops.mla_attention(q, k_frozen, v, cu, 17, softmax_scale=0.2, backend="triton")
    assert isinstance(out, torch.Tensor)
    out.backward(dout)
    torch.testing.assert_close(out, ref_out, **tol(torch.float32))
    mags = _abs_sums(q, k, v, cu, 0.2, True, dout, torch.zeros_like(dlse))
    assert_reduction_close(q.grad, ref_grads[0], mags[1], torch.float32)
    assert_reduction_close(v.grad, ref_grads[2], mags[3], torch.float32)
    assert k.grad is None
    # only lse used: the output's gradient is absent (None), lse's alone drives dq / dk, dv is 0
    _, lse = ops.mla_attention(q, k, v, cu, 17, softmax_scale=0.2, return_lse=True, backend="triton")
    dq, dk, dv = torch.autograd.grad(lse, [q, k, v], dlse)
    _, ref_lse, ref_g = _reference(q, k, v, cu, 17, 0.2, True, torch.zeros_like(dout), dlse)
    torch.testing.assert_close(lse, ref_lse, **tol(torch.float32))
    mags = _abs_sums(q, k, v, cu, 0.2, True, torch.zeros_like(dout), dlse)
    assert_reduction_close(dq, ref_g[0], mags[1], torch.float32)
    assert_reduction_close(dk, ref_g[1], mags[2], torch.float32)
    assert torch.equal(dv, torch.zeros_like(dv))
    with torch.no_grad():
        assert ops.mla_attention(q, k, v, cu, 17, softmax_scale=0.2, backend="triton").grad_fn is None


def test_backward_is_deterministic():
    (q, k, v), cu, dout, dlse = _problem([40, 0, 33], 2, 48, 32, seed=7)
    first = _triton(q, k, v, cu, 40, 0.3, True, dout, dlse)[2]
    second = _triton(q, k, v, cu, 40, 0.3, True, dout, dlse)[2]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_empty_inputs():
    # no tokens at all, and sequences that are all empty
    for lens in ([], [0], [0, 0]):
        (q, k, v), cu, dout, dlse = _problem(lens, 2, 32, 16, seed=8)
        out, lse = ops.mla_attention(q, k, v, cu, 0, softmax_scale=1.0, return_lse=True, backend="triton")
        assert out.shape == (0, 2, 16) and lse.shape == (2, 0)
        out.sum().backward()
        assert q.grad.shape == q.shape and v.grad.shape == v.shape


def test_errors_name_the_argument():
    (q, k, v), cu, _, _ = _problem([5], 2, 48, 32)
    with pytest.raises(r1kernels.BackendUnavailable, match=r"Dqk = 40 must be a multiple of 16"):
        ops.mla_attention(q[..., :40], k[..., :40], v, cu, 5, softmax_scale=1.0, backend="triton")
    with pytest.raises(r1kernels.BackendUnavailable, match=r"Dv = 24 must be a multiple of 16"):
        ops.mla_attention(q, k, v[..., :24], cu, 5, softmax_scale=1.0, backend="triton")
    big = torch.zeros(5, 1, 272, device=DEV)
    with pytest.raises(r1kernels.BackendUnavailable, match=r"Dqk = 272 must be a multiple of 16 in \[16, 256\]"):
        ops.mla_attention(big, big, big[..., :16], cu, 5, softmax_scale=1.0, backend="triton")
    with pytest.raises(ValueError, match=r"mla_attention: k must have shape \[5, 2, 48\]"):
        ops.mla_attention(q, k[:, :1], v, cu, 5, softmax_scale=1.0, backend="triton")
    with pytest.raises(TypeError, match=r"mla_attention: v must be float32"):
        ops.mla_attention(q, k, v.half(), cu, 5, softmax_scale=1.0, backend="triton")
    with pytest.raises(TypeError, match=r"mla_attention: cu_seqlens must be int32"):
        ops.mla_attention(q, k, v, cu.long(), 5, softmax_scale=1.0, backend="triton")
    # the launchers check too, for callers that bypass the op
    from r1kernels.triton.mla import mla_attention_bwd, mla_attention_fwd

    with pytest.raises(ValueError, match=r"mla_attention_fwd: Dqk = 40 must be a multiple of 16"):
        mla_attention_fwd(q[..., :40], k[..., :40], v, cu, 5, 1.0, True)
    with pytest.raises(ValueError, match=r"mla_attention_fwd: cu_seqlens must be int32 \[B \+ 1\]"):
        mla_attention_fwd(q, k, v, cu.long(), 5, 1.0, True)
    with pytest.raises(ValueError, match=r"mla_attention_fwd: max_seqlen must be >= 0"):
        mla_attention_fwd(q, k, v, cu, -1, 1.0, True)
    out, lse = mla_attention_fwd(q.detach(), k.detach(), v.detach(), cu, 5, 1.0, True)
    with pytest.raises(ValueError, match=r"mla_attention_bwd: lse must be the forward's fp32 \[2, 5\]"):
        mla_attention_bwd(out, q, k, v, out, lse.t(), cu, 5, 1.0, True)
    with pytest.raises(ValueError, match=r"mla_attention_bwd: dout must be \[5, 2, 32\]"):
        mla_attention_bwd(out[:4], q, k, v, out, lse, cu, 5, 1.0, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter switch")
def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    (q, k, v), cu, _, _ = _problem([5], 2, 48, 32)
    with pytest.raises(r1kernels.BackendUnavailable, match="TRITON_INTERPRET=1 is not set"):
        ops.mla_attention(q, k, v, cu, 5, softmax_scale=1.0, backend="triton")


# ---------------------------------------------------------------------------------------------------------
# GPU: V3 head dims (192 / 128) in bf16 and fp16, several tiles per sequence, and the fp32 path's precision.

V3_GPU_CASES = {
    "varlen": ([1000, 0, 129, 17, 1], 4),
    "long": ([2048, 1500], 2),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(V3_GPU_CASES))
def test_v3_dims_on_gpu(case, causal, dtype):
    lens, h = V3_GPU_CASES[case]
    (q, k, v), cu, dout, dlse = _problem(lens, h, 192, 128, dtype, seed=11)
    assert_matches_reference(q, k, v, cu, max(lens), causal, dout, dlse)


@pytest.mark.gpu
def test_fp32_on_gpu_is_ieee():
    # fp32 dots must not drop to TF32 (which would miss the 1e-5 tolerance by orders of magnitude)
    (q, k, v), cu, dout, dlse = _problem([300, 0, 77], 2, 192, 128, seed=12)
    assert_matches_reference(q, k, v, cu, 300, True, dout, dlse)


@pytest.mark.gpu
def test_auto_picks_triton_on_gpu_and_no_host_sync():
    (q, k, v), cu, dout, dlse = _problem([513, 0, 64], 4, 192, 128, torch.bfloat16, seed=13)
    assert ops.MLA_ATTENTION.select("auto", q, k, v, cu, 513, 0.1, True, True)[0] in ("triton", "cuda")
    for _ in range(2):  # the first pass compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, lse, grads = _triton(q, k, v, cu, 513, 0.1, True, dout, dlse)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ref_out, ref_lse, _ = _reference(q, k, v, cu, 513, 0.1, True, dout, dlse)
    assert_reduction_close(out, ref_out.to(out.dtype), _abs_sums(q, k, v, cu, 0.1, True, dout, dlse)[0], torch.bfloat16)
