"""The ``cpu`` backend of ``moe_experts`` (``r1kernels/ops/_moe_grouped.py``: torch._grouped_mm over the slots
sorted by expert) against the loop-over-experts reference: forward, backward, edge cases, the reasons it
declines a call (and ``auto`` then takes the reference), and the absence of data-dependent host reads."""
import pytest
import torch
from conftest import assert_reduction_close, tol

import r1kernels
from r1kernels import BackendUnavailable, ops, reference
from r1kernels.ops import MOE_EXPERTS, _moe_grouped


def _inputs(t, d, inter, e, k, dtype=torch.float32, seed=0, ids=None):
    g = torch.Generator().manual_seed(seed)
    # scales keep h = W13 x and the output O(1) whatever D and I (no cancellation hiding errors)
    x = torch.randn(t, d, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * inter, d, generator=g) * d ** -0.5).to(dtype)
    w2 = (torch.randn(e, d, inter, generator=g) * inter ** -0.5).to(dtype)
    if ids is None:  # k distinct experts per token, as moe_route returns them
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k)
    ids = ids.to(torch.int32)
    weights = torch.rand(t, k, generator=g) + 0.1
    return x, w13, w2, weights, ids


def _abs_sums(x, w13, w2, weights, ids, dy):
    """Per element of dW13 and dW2, the sum of |terms| the gradient adds up (float64; its own loop over
    experts): the scale assert_reduction_close needs."""
    x, w13, w2, weights, dy = (v.detach().double() for v in (x, w13, w2, weights, dy))
    t, k = ids.shape
    inter = w2.shape[2]
    s13, s2 = torch.zeros_like(w13), torch.zeros_like(w2)
    flat = ids.reshape(-1).long()
    tok = torch.arange(t).repeat_interleave(k)
    for e in range(w13.shape[0]):
        slots = (flat == e).nonzero().flatten()
        if slots.numel() == 0:
            continue
        xt = x[tok[slots]]
        h = xt @ w13[e].t()
        gate, up = h[:, :inter], h[:, inter:]
        sig = gate.sigmoid()
        a = gate * sig * up
        dya = dy[tok[slots]] * weights.reshape(-1)[slots, None]
        da = dya @ w2[e]
        dh = torch.cat((da * up * sig * (1 + gate * (1 - sig)), da * gate * sig), 1)
        s13[e] = dh.abs().t() @ xt.abs()
        s2[e] = dya.abs().t() @ a.abs()
    return s13, s2


def _check_fwd_bwd(x, w13, w2, weights, ids, seed=1):
    leaves = [v.detach().clone().requires_grad_(True) for v in (x, w13, w2, weights)]
    ref_leaves = [v.detach().clone().requires_grad_(True) for v in (x, w13, w2, weights)]
    y = ops.moe_experts(*leaves, ids, backend="cpu")
    y_ref = reference.moe_experts(*ref_leaves, ids)
    torch.testing.assert_close(y, y_ref, **tol(x.dtype))
    assert y.dtype == x.dtype
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    if x.shape[0] == 0:
        for gr, leaf in zip(grads, leaves):
            assert gr.shape == leaf.shape and not gr.any()
        return
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy, allow_unused=True)
    dx, dw13, dw2, dwts = grads
    rdx, rdw13, rdw2, rdwts = (torch.zeros_like(l) if g is None else g for g, l in zip(ref_grads, ref_leaves))
    torch.testing.assert_close(dx, rdx, **tol(x.dtype))
    torch.testing.assert_close(dwts, rdwts, **tol(torch.float32))
    s13, s2 = _abs_sums(x, w13, w2, weights, ids, dy)
    assert_reduction_close(dw13, rdw13, s13, w13.dtype)
    assert_reduction_close(dw2, rdw2, s2, w2.dtype)
    assert (dx.dtype, dw13.dtype, dw2.dtype, dwts.dtype) == (x.dtype, w13.dtype, w2.dtype, torch.float32)


TINY = r1kernels.ModelConfig.preset("tiny")


@pytest.mark.parametrize("t,d,inter,e,k", [
    (64, TINY.hidden_size, TINY.moe_intermediate_size, TINY.n_routed_experts, TINY.num_experts_per_tok),  # tiny preset
    (1, 32, 16, 8, 2),  # T = 1
    (3, 32, 16, 64, 4),  # E > T*K: most experts get nothing
    (17, 36, 12, 8, 3),  # odd T and K; D, I multiples of 4 only (the fp32 alignment)
    (129, 64, 20, 5, 5),  # every token picks every expert
    (33, 16, 4, 1, 1),  # one expert
])
def test_fp32_forward_backward_match_reference(t, d, inter, e, k):
    _check_fwd_bwd(*_inputs(t, d, inter, e, k))


def test_experts_with_zero_tokens_get_zero_gradients():
    ids = torch.tensor([[0, 3], [3, 0], [0, 3], [3, 5]])  # experts 1, 2, 4, 6, 7 get no token
    x, w13, w2, weights, ids = _inputs(4, 32, 16, 8, 2, ids=ids)
    _check_fwd_bwd(x, w13, w2, weights, ids)
    w13 = w13.clone().requires_grad_(True)
    w2 = w2.clone().requires_grad_(True)
    ops.moe_experts(x, w13, w2, weights, ids, backend="cpu").square().sum().backward()
    for empty in (1, 2, 4, 6, 7):
        assert not w13.grad[empty].any() and not w2.grad[empty].any()
    assert w13.grad[0].any() and w2.grad[5].any()


def test_no_tokens():
    _check_fwd_bwd(*_inputs(0, 32, 16, 4, 2))


def test_expanded_upstream_gradient_and_int64_ids():
    # y.sum().backward() hands the backward a stride-0 gradient (torch._grouped_mm's own autograd fails on it)
    x, w13, w2, weights, ids = _inputs(9, 32, 16, 8, 2)
    leaves = [v.clone().requires_grad_(True) for v in (x, w13, w2, weights)]
    ops.moe_experts(*leaves, ids.long(), backend="cpu").sum().backward()
    ref = [v.clone().requires_grad_(True) for v in (x, w13, w2, weights)]
    reference.moe_experts(*ref, ids).sum().backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs():
    x, w13, w2, weights, ids = _inputs(11, 32, 16, 8, 2)
    x_nc = torch.cat((x, torch.randn(11, 8)), 1)[:, :32]  # a column slice: row stride 40
    w13_nc = w13.transpose(1, 2).contiguous().transpose(1, 2)  # stored [E, D, 2I]: unit stride along 2I
    w2_nc = w2.transpose(1, 2).contiguous().transpose(1, 2)
    weights_nc = torch.cat((weights, weights), 1)[:, ::2]
    assert _moe_grouped.reason(x_nc, w13_nc, w2_nc, weights_nc, ids) is None
    _check_fwd_bwd(x_nc, w13_nc, w2_nc, weights_nc, ids)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(dtype):
    x, w13, w2, weights, ids = _inputs(37, 64, 32, 8, 3, dtype=dtype)
    y = ops.moe_experts(x, w13, w2, weights, ids, backend="cpu")
    assert y.dtype == dtype
    # the reference rounds each expert's GEMM outputs to the dtype as this backend does, and sums in fp32
    torch.testing.assert_close(y, reference.moe_experts(x, w13, w2, weights, ids), **tol(dtype))


def test_bf16_backward_close_to_fp32_gradients():
    # bf16 GEMMs round their products' inputs and outputs: compare with the fp32 gradients of the same
    # (bf16-representable) inputs, relative to each gradient's size
    x, w13, w2, weights, ids = _inputs(40, 64, 32, 8, 2, dtype=torch.bfloat16)
    lo = [v.clone().requires_grad_(True) for v in (x, w13, w2, weights)]
    hi = [v.float().requires_grad_(True) for v in (x, w13, w2, weights)]
    dy = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(ops.moe_experts(*lo, ids, backend="cpu"), lo, dy.bfloat16())
    want = torch.autograd.grad(reference.moe_experts(*hi, ids), hi, dy)
    for g_lo, g_hi in zip(got, want):
        err = (g_lo.float() - g_hi).norm() / g_hi.norm()
        assert err < 2e-2, err


def test_deterministic_and_bitwise_reproducible():
    x, w13, w2, weights, ids = _inputs(50, 64, 32, 8, 4)
    runs = [ops.moe_experts(x, w13, w2, weights, ids, deterministic=det, backend="cpu") for det in (False, True, True)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2])


def test_auto_takes_cpu_backend_on_cpu_tensors():
    args = _inputs(8, 32, 16, 8, 2)
    assert MOE_EXPERTS.select("auto", *args, False)[0] == "cpu"
    assert r1kernels.info()["ops"]["moe_experts"]["cpu"]["cpu"] == "ok"


def assert_falls_back(args, match):
    """The cpu backend declines with a reason matching ``match``; auto then runs the reference."""
    why = _moe_grouped.reason(*args)
    assert why is not None and match in why, why
    assert MOE_EXPERTS.select("auto", *args, False)[0] == "reference"
    with pytest.raises(BackendUnavailable, match="'cpu' cannot run this call"):
        ops.moe_experts(*args, backend="cpu")
    torch.testing.assert_close(ops.moe_experts(*args), reference.moe_experts(*args))


def test_unaligned_hidden_size_falls_back():
    assert_falls_back(_inputs(5, 33, 16, 4, 2), "D (hidden size) = 33")


def test_unaligned_intermediate_size_falls_back():
    assert_falls_back(_inputs(5, 32, 6, 4, 2), "I (expert intermediate size) = 6")


def test_bf16_needs_multiples_of_8():
    # 16 bytes are 4 fp32 but 8 bf16 elements: D = 36 runs in fp32 and not in bf16
    assert _moe_grouped.reason(*_inputs(5, 36, 16, 4, 2)) is None
    assert_falls_back(_inputs(5, 36, 16, 4, 2, dtype=torch.bfloat16), "not a multiple of 8")


def test_weights_with_unaligned_row_stride_fall_back():
    x, w13, w2, weights, ids = _inputs(5, 32, 16, 4, 2)
    w13_wide = torch.cat((w13, torch.zeros(4, 32, 1)), 2)[:, :, :32]  # rows 33 floats apart
    assert_falls_back((x, w13_wide, w2, weights, ids), "w13")


def test_fallback_reasons_without_grouped_mm_under_compile_and_off_cpu(monkeypatch):
    args = _inputs(5, 32, 16, 4, 2)
    meta = [a.to("meta") for a in args]
    assert "CPU tensors" in _moe_grouped.reason(*meta)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "bfloat16 only" in _moe_grouped.reason(*args)
    monkeypatch.undo()
    _moe_grouped._PROBED.clear()
    monkeypatch.delattr(torch, "_grouped_mm")
    try:
        assert "has no torch._grouped_mm" in _moe_grouped.reason(*args)
        assert "has no torch._grouped_mm" in _moe_grouped.device_reason(torch.device("cpu"))
    finally:
        monkeypatch.undo()
        _moe_grouped._PROBED.clear()
    assert _moe_grouped.reason(*args) is None


def test_no_data_dependent_host_reads():
    """Forward and backward run on meta tensors (no data at all): no .item(), no data-dependent shape, so no
    host sync on a device either (bf16: the dtype torch._grouped_mm's meta kernel takes)."""
    x, w13, w2, weights, ids = (a.to("meta") for a in _inputs(6, 32, 16, 8, 3, dtype=torch.bfloat16))
    leaves = [v.requires_grad_(True) for v in (x, w13, w2, weights)]
    y = _moe_grouped.moe_experts_grouped(*leaves, ids)
    assert y.shape == (6, 32) and y.device.type == "meta"
    grads = torch.autograd.grad(y, leaves, torch.empty_like(y))
    assert [g.shape for g in grads] == [v.shape for v in leaves]


def test_tiny_model_moe_layer_uses_cpu_backend_and_matches_reference():
    model = r1kernels.Transformer(TINY).eval()
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, TINY.vocab_size, (2, 24))
    with torch.no_grad():
        got = model(ids)
        with r1kernels.use_backend("reference"):
            want = model(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_traces_under_torch_compile_in_bf16():
    # bf16 is what torch._grouped_mm's meta kernel takes: the backend itself is traced (fullgraph, no data-
    # dependent shape); aot_eager checks the tracing and the autograd graph without compiling C++
    x, w13, w2, weights, ids = _inputs(8, 32, 16, 4, 2, dtype=torch.bfloat16)
    leaves = [v.clone().requires_grad_(True) for v in (x, w13, w2, weights)]
    f = torch.compile(lambda *a: ops.moe_experts(*a, backend="cpu"), backend="aot_eager", fullgraph=True)
    y = f(*leaves, ids)
    torch.testing.assert_close(y, ops.moe_experts(x, w13, w2, weights, ids, backend="cpu"), atol=0, rtol=0)
    y.float().square().sum().backward()
    assert all(v.grad is not None and v.grad.shape == v.shape for v in leaves)
