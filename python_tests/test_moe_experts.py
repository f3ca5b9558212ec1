"""Routed experts: the Triton backend against torch autograd through ``reference.moe_experts``.

Runs on the GPU when there is one, else under the Triton interpreter (conftest sets TRITON_INTERPRET);
fp32 and fp16 everywhere, bf16 only on the GPU (the interpreter's bf16 tl.dot is wrong, DESIGN).

The expected values come from the reference run on fp64 copies of the inputs (its per-expert output is
accumulated in fp32, so it is exact to fp32 level), cast to the kernel's dtypes. Results that the kernels
sum over many terms (weight gradients over an expert's rows; anything in half precision, where A, H and dH
are rounded to x's dtype on the way) are compared with ``assert_reduction_close`` against the sum of
|terms| counted from the last rounded intermediate on (``_abs_sums``).
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_reduction_close, tol

import r1kernels
from r1kernels import ops, reference

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERP_DTYPES = [torch.float32, torch.float16]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _problem(t, d, i, e, k, dtype=torch.float32, seed=0, ids=None):
    """Random (x, w13, w2, weights, expert_ids) scaled so that every intermediate is O(1)."""
    g = _gen(seed)
    x = torch.randn(t, d, generator=g)
    w13 = torch.randn(e, 2 * i, d, generator=g) / d ** 0.5
    w2 = torch.randn(e, d, i, generator=g) / i ** 0.5
    weights = torch.rand(t, k, generator=g) + 0.1
    if ids is None:  # k distinct experts per token, as a router picks them
        ids = torch.rand(t, e, generator=g).argsort(-1)[:, :k].to(torch.int32)
    cast = lambda a: a.to(device=DEV, dtype=dtype)  # noqa: E731
    return cast(x), cast(w13), cast(w2), weights.to(DEV), ids.to(DEV)


def _dy(t, d, dtype, seed=7):
    return torch.randn(t, d, generator=_gen(seed)).to(device=DEV, dtype=dtype)


def _triton(x, w13, w2, weights, ids, dy, deterministic=False):
    """Triton output and the gradients of (x, w13, w2, weights)."""
    leaves = [a.detach().requires_grad_(True) for a in (x, w13, w2, weights)]
    y = ops.moe_experts(*leaves, ids, deterministic=deterministic, backend="triton")
    y.backward(dy)
    return y, [a.grad for a in leaves]


def _reference(x, w13, w2, weights, ids, dy):
    """Reference output and gradients on fp64 copies (weights stay fp32, as the reference takes them)."""
    leaves = [a.detach().double().requires_grad_(True) for a in (x, w13, w2)]
    leaves.append(weights.detach().clone().requires_grad_(True))
    y = reference.moe_experts(*leaves, ids)
    y.backward(dy.double())
    return y, [a.grad for a in leaves]


def _abs_sums(x, w13, w2, weights, ids, dy):
    """Per result element, the sum of |terms| the kernels add up (fp64), for ``assert_reduction_close``.

    The kernels keep A = silu(g) * u, H = [g | u] and dH rounded to x's dtype and sum everything after in
    fp32, so a result's terms are counted from those intermediates on, each with room for its own rounding:
    |a| is taken as (|silu'(g) g| + |silu(g)|) |u| (a rounding of g or u moves a by about that times the
    unit roundoff). Sums of exact inputs in fp32 (h = W13_e x, G = dy @ W2_e) count as exact: their error,
    a few fp32 roundoffs, is far below every tolerance of the table.
    Returns ``[y, dx, dw13, dw2, dweights]`` magnitudes shaped like the results.
    """
    x, w13, w2, dy = (a.detach().double() for a in (x, w13, w2, dy))
    t, k = ids.shape
    inter = w2.shape[2]
    flat = ids.reshape(-1).long()
    token_of = torch.arange(t, device=x.device).repeat_interleave(k)
    w = weights.detach().reshape(-1).double().abs()
    y, dx = torch.zeros_like(x), torch.zeros_like(x)
    dw13, dw2 = torch.zeros_like(w13), torch.zeros_like(w2)
    dweights = torch.zeros(t * k, dtype=torch.float64, device=x.device)
    for e in range(w13.shape[0]):
        slots = (flat == e).nonzero().flatten()
        if slots.numel() == 0:
            continue
        tok, ws = token_of[slots], w[slots, None]
        h = x[tok] @ w13[e].t()
        g, u = h[:, :inter], h[:, inter:]
        sig = torch.sigmoid(g)
        dsilu = sig * (1 + g * (1 - sig))
        silu_abs = (dsilu * g).abs() + F.silu(g).abs()  # silu(g) with room for g's rounding
        a_abs = silu_abs * u.abs()
        dyt = dy[tok].abs()
        g_abs = (dy[tok] @ w2[e]).abs()  # [n, I]: |G|
        # dgate = w G u silu'(g) (|silu''| <= 0.5, so g's rounding moves silu'(g) by <= |g| roundoffs),
        # dup = w G silu(g)
        dh_abs = torch.cat([ws * g_abs * u.abs() * (dsilu.abs() + g.abs()), ws * g_abs * silu_abs], 1)
        y.index_add_(0, tok, ws * (a_abs @ w2[e].abs().t()))
        dweights[slots] = (g_abs * a_abs).sum(1)
        dw2[e] = (ws * dyt).t() @ a_abs
        dx.index_add_(0, tok, dh_abs @ w13[e].abs())
        dw13[e] = dh_abs.t() @ x[tok].abs()
    return [y, dx, dw13, dw2, dweights.view(t, k)]


def assert_matches_reference(x, w13, w2, weights, ids, deterministic=False, dy=None):
    dtype = x.dtype
    dy = _dy(x.shape[0], x.shape[1], dtype) if dy is None else dy
    y, grads = _triton(x, w13, w2, weights, ids, dy, deterministic)
    ref_y, ref_grads = _reference(x, w13, w2, weights, ids, dy)
    mags = _abs_sums(x, w13, w2, weights, ids, dy)

    assert y.dtype == dtype and y.shape == x.shape
    assert [g.dtype for g in grads] == [dtype, dtype, dtype, torch.float32]
    names = ("y", "dx", "dw13", "dw2", "dweights")
    for name, out, ref, mag in zip(names, [y, *grads], [ref_y, *ref_grads], mags):
        ref = ref.to(out.dtype)
        try:
            if dtype == torch.float32 and name in ("y", "dx", "dweights"):
                # per token: sums over one token's few slots; fp32 within the table's 1e-5 relative
                torch.testing.assert_close(out, ref, **tol(torch.float32))
            else:
                # weight gradients (sums over an expert's rows), and any half-precision result (the
                # kernels round A / H / dH to x's dtype, like any half-precision MLP)
                assert_reduction_close(out, ref, mag, dtype)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    return y, grads


# Odd D and I; T = 1; E > T*K (experts with no token); with E = 4 and T = 33 several row blocks per expert.
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("d,i", [(40, 24), (72, 56)], ids=lambda v: str(v))
@pytest.mark.parametrize("e", [4, 16])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("t", [1, 5, 33])
def test_forward_backward_match_reference(t, k, e, d, i, dtype):
    assert_matches_reference(*_problem(t, d, i, e, k, dtype=dtype, seed=t * 100 + k * 10 + e))


@pytest.mark.parametrize("ids", [
    [[3, 5]] * 33,  # two experts take all 33 tokens (3 row blocks each), the other 6 none
    [[2]] * 33,  # K = 1: one expert, every token
    [[1, 1]] * 5,  # a token may name one expert twice: both slots count
], ids=["two-experts", "one-expert", "repeated-expert"])
def test_experts_without_tokens(ids):
    ids = torch.tensor(ids, dtype=torch.int64)  # int64 ids are accepted too
    t, k = ids.shape
    x, w13, w2, weights, ids = _problem(t, 40, 24, 8, k, ids=ids)
    _, grads = assert_matches_reference(x, w13, w2, weights, ids)
    used = torch.zeros(8, dtype=torch.bool)
    used[ids.reshape(-1).cpu()] = True
    assert torch.equal(grads[1][~used], torch.zeros_like(grads[1][~used]))  # exactly zero, not garbage
    assert torch.equal(grads[2][~used], torch.zeros_like(grads[2][~used]))


def test_with_every_align_backend():
    # the grouped GEMMs only rely on moe_align's contract, whichever backend computes it
    problem = _problem(33, 40, 24, 4, 4, seed=11)
    dev_kind = "cuda" if DEV.type == "cuda" else "cpu"
    for backend, impl in ops.MOE_ALIGN.impls.items():
        if impl.check(problem[4], 4, 16) is not None:
            continue  # e.g. the CUDA kernel on a CPU machine
        assert backend in ("reference", "triton", dev_kind)
        with r1kernels.use_backend(backend):  # moe_align inside follows it; moe_experts is forced to triton
            assert_matches_reference(*problem)


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_deterministic_is_bitwise_reproducible(dtype):
    problem = _problem(33, 72, 56, 16, 4, dtype=dtype, seed=3)
    dy = _dy(33, 72, dtype, seed=4)
    y1, g1 = assert_matches_reference(*problem, deterministic=True, dy=dy)
    y2, g2 = _triton(*problem, dy, deterministic=True)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_non_contiguous_inputs(dtype):
    x, w13, w2, weights, ids = _problem(17, 40, 24, 4, 2, dtype=dtype, seed=5)
    x_t = x.t().contiguous().t()  # columns strided (row stride 1)
    w13_t = w13.transpose(1, 2).contiguous().transpose(1, 2)  # [E, 2I, D] with D the slow dim
    w2_wide = torch.zeros(4, 40, 50, dtype=dtype, device=DEV)
    w2_wide[:, :, 10:34] = w2
    w2_s = w2_wide[:, :, 10:34]  # a slice of a wider tensor
    weights_t = weights.t().contiguous().t()
    ids_t = ids.t().contiguous().t()
    dy = _dy(40, 17, dtype).t()  # dy transposed too
    for a in (x_t, w13_t, w2_s, weights_t, ids_t, dy):
        assert not a.is_contiguous()
    assert_matches_reference(x_t, w13_t, w2_s, weights_t, ids_t, dy=dy)
    assert_matches_reference(x[::2], w13, w2, weights[::2], ids[::2])  # every other row: row stride 2D


def test_only_the_needed_grads_and_inference():
    x, w13, w2, weights, ids = _problem(5, 40, 24, 4, 2)
    xg = x.clone().requires_grad_(True)
    y = ops.moe_experts(xg, w13, w2, weights, ids, backend="triton")  # frozen experts and router
    y.backward(_dy(5, 40, x.dtype))
    _, ref_grads = _reference(x, w13, w2, weights, ids, _dy(5, 40, x.dtype))
    torch.testing.assert_close(xg.grad, ref_grads[0].float(), **tol(torch.float32))
    assert w13.grad is None and w2.grad is None and weights.grad is None
    # without autograd (no_grad or no input needing a gradient) the forward keeps nothing for a backward
    with torch.no_grad():
        y_ng = ops.moe_experts(xg, w13, w2, weights, ids, backend="triton")
    assert y_ng.grad_fn is None
    torch.testing.assert_close(y_ng, y.detach(), atol=0, rtol=0)
    torch.testing.assert_close(ops.moe_experts(x, w13, w2, weights, ids, backend="triton"), y_ng, atol=0, rtol=0)


def test_no_tokens():
    x, w13, w2, weights, ids = _problem(0, 40, 24, 4, 2)
    leaves = [a.requires_grad_(True) for a in (x, w13, w2, weights)]
    y = ops.moe_experts(*leaves, ids, backend="triton")
    assert y.shape == (0, 40)
    y.sum().backward()
    assert leaves[0].grad.shape == (0, 40) and leaves[3].grad.shape == (0, 2)
    assert torch.equal(leaves[1].grad, torch.zeros_like(w13)) and torch.equal(leaves[2].grad, torch.zeros_like(w2))


def test_errors_name_the_argument():
    x, w13, w2, weights, ids = _problem(5, 40, 24, 4, 2)
    with pytest.raises(ValueError, match=r"moe_experts: w13 must be \[E, 2I, D=40\]"):
        ops.moe_experts(x, w13[:, :, :39], w2, weights, ids, backend="triton")
    with pytest.raises(ValueError, match=r"moe_experts: w2 must have shape \[4, 40, 24\]"):
        ops.moe_experts(x, w13, w2[:, :, :23], weights, ids, backend="triton")
    with pytest.raises(TypeError, match=r"moe_experts: w13 must be float32"):
        ops.moe_experts(x, w13.half(), w2, weights, ids, backend="triton")
    with pytest.raises(TypeError, match=r"moe_experts: weights must be float32"):
        ops.moe_experts(x, w13, w2, weights.half(), ids, backend="triton")
    with pytest.raises(ValueError, match=r"moe_experts: expert_ids must be \[T=5, K\]"):
        ops.moe_experts(x, w13, w2, weights, ids[:4], backend="triton")
    # the launchers check too, for callers that bypass the op
    from r1kernels.triton.moe import moe_experts_bwd, moe_experts_fwd

    slots, blocks, num_padded, counts = ops.moe_align(ids, 4, 16)
    with pytest.raises(ValueError, match=r"block_m must be a power of two >= 16"):
        moe_experts_fwd(x, w13, w2, weights, slots, blocks, num_padded, 8)
    with pytest.raises(ValueError, match=r"sorted_slots must be int32 \[\d+\] \(moe_align with block_size=32\)"):
        moe_experts_fwd(x, w13, w2, weights, slots, blocks, num_padded, 32)
    with pytest.raises(ValueError, match=r"moe_experts_bwd: h must be the forward's"):
        moe_experts_bwd(x, x, w13, w2, weights, None, slots, blocks, num_padded, counts, 16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter switch")
def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(r1kernels.BackendUnavailable, match="TRITON_INTERPRET=1 is not set"):
        ops.moe_experts(*_problem(5, 40, 24, 4, 2), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape", [(33, 72, 56, 16, 4), (257, 256, 192, 16, 4), (1000, 512, 384, 64, 6)],
                         ids=lambda s: "T{}-D{}-I{}-E{}-K{}".format(*s))
def test_bf16_on_gpu(shape, deterministic):
    assert_matches_reference(*_problem(*shape, dtype=torch.bfloat16), deterministic=deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(257, 256, 192, 16, 4), (1000, 512, 384, 64, 6)],
                         ids=lambda s: "T{}-D{}-I{}-E{}-K{}".format(*s))
def test_fp32_on_gpu_is_ieee(shape):
    # fp32 dots must not drop to TF32 (which would miss the 1e-5 tolerance by orders of magnitude)
    assert_matches_reference(*_problem(*shape, dtype=torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("align_backend", ["cuda", "triton"])
def test_no_host_sync_on_gpu(align_backend):
    if align_backend not in ops.MOE_ALIGN.impls:
        pytest.skip(f"moe_align has no {align_backend!r} backend")
    x, w13, w2, weights, ids = _problem(257, 256, 192, 16, 4, dtype=torch.bfloat16)
    leaves = [a.requires_grad_(True) for a in (x, w13, w2, weights)]
    dy = _dy(257, 256, torch.bfloat16)
    with r1kernels.use_backend(align_backend):  # moe_align inside follows it; moe_experts is forced below
        for _ in range(2):  # the first pass compiles the kernels
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                y = ops.moe_experts(*leaves, ids, backend="triton")
                y.backward(dy)
                y_det = ops.moe_experts(*leaves, ids, deterministic=True, backend="triton")
            finally:
                torch.cuda.set_sync_debug_mode("default")
    ref_y, _ = _reference(x, w13, w2, weights, ids, dy)
    abs_y = _abs_sums(x, w13, w2, weights, ids, dy)[0]
    assert_reduction_close(y, ref_y.to(y.dtype), abs_y, torch.bfloat16)
    assert_reduction_close(y_det, ref_y.to(y.dtype), abs_y, torch.bfloat16)
