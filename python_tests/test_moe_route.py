"""moe_route's Triton (interpreter here, GPU on the device suite), C++ CPU and CUDA backends against the
reference: expert ids (order included) and counts exactly, weights to fp32 rounding.

Letters: T tokens, E experts, G groups (n_group), K experts per token.
"""
import itertools

import pytest
import torch

import r1kernels
from r1kernels import _native, ops, reference
from r1kernels.ops._native import moe_route_native

_C = _native.module()
CPU_BACKENDS = ["triton"] + (["cpu"] if _C is not None else [])
needs_c = pytest.mark.skipif(_C is None, reason=f"r1kernels._C is not built: {_native.cpu_reason()}")
# Weights are fp32 products and quotients of the same scores; only the order of the K-term sum (and, for
# softmax, of the E-term sum) differs from the reference.
W_TOL = dict(atol=2e-6, rtol=2e-6)


def _groups(e, n_group):
    """(topk_group, top_k) for E experts in n_group groups: V3-like (keep half the groups, top-8) where it fits."""
    topk_group = max(1, n_group // 2)
    return topk_group, min(8, topk_group * (e // n_group))


def _inputs(t, e, *, seed, dtype=torch.float32, device="cpu", ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:
        # A few distinct values: equal experts and equal groups everywhere, in both selection and weights.
        logits = torch.randint(-2, 3, (t, e), generator=g).float() * 0.5
        bias = -0.25 * torch.randint(0, 3, (e,), generator=g).float()
    else:
        logits = torch.randn(t, e, generator=g) * 2
        bias = torch.randn(e, generator=g) * 0.5 - 0.7  # mostly negative: -inf vs 0.0 masking differs here
    return logits.to(device=device, dtype=dtype), bias.to(device)


def assert_matches_reference(backend, logits, bias, **kw):
    kw.setdefault("routed_scaling_factor", 2.5)
    w, ids, counts = ops.moe_route(logits, bias, return_counts=True, backend=backend, **kw)
    w_ref, ids_ref, counts_ref = reference.moe_route(logits, bias, return_counts=True, **kw)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and counts.dtype == torch.int32
    assert torch.equal(ids.cpu(), ids_ref.cpu()), "expert ids differ from the reference"
    torch.testing.assert_close(w.cpu(), w_ref.cpu(), **W_TOL)
    assert torch.equal(counts.cpu(), counts_ref.cpu())
    assert torch.equal(counts.cpu(), reference.expert_counts(ids_ref.cpu(), logits.shape[1]))


SHAPES = [(e, g) for e in (8, 16, 64, 160, 256, 384) for g in (1, 4, 8) if e % g == 0]
SCORES = [("sigmoid", "top2_sum"), ("softmax", "max"), ("sigmoid", "max"), ("softmax", "top2_sum")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("e,n_group", SHAPES)
@pytest.mark.parametrize("score_func,group_score", SCORES)
def test_matches_reference(backend, e, n_group, score_func, group_score):
    topk_group, k = _groups(e, n_group)
    norm = (e // 8 + n_group) % 2 == 0  # both settings across the matrix
    logits, bias = _inputs(300, e, seed=e * 31 + n_group)
    assert_matches_reference(backend, logits, bias, top_k=k, n_group=n_group, topk_group=topk_group, score_func=score_func,
           group_score=group_score, norm_topk_prob=norm)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("e,n_group", [(16, 4), (64, 8), (160, 8), (256, 8)])
@pytest.mark.parametrize("score_func,group_score", SCORES[:2])
@pytest.mark.parametrize("norm", [True, False])
def test_exact_ties_resolve_like_the_reference(backend, e, n_group, score_func, group_score, norm):
    """Quantised logits and biases: many equal experts and equal groups; order must match exactly."""
    topk_group, k = _groups(e, n_group)
    logits, bias = _inputs(300, e, seed=e + n_group, ties=True)
    assert_matches_reference(backend, logits, bias, top_k=k, n_group=n_group, topk_group=topk_group, score_func=score_func,
           group_score=group_score, norm_topk_prob=norm)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("t", [1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_token_counts_and_dtypes(backend, t, dtype):
    logits, bias = _inputs(t, 256, seed=t, dtype=dtype)
    assert_matches_reference(backend, logits, bias, top_k=8, n_group=8, topk_group=4)
    assert_matches_reference(backend, logits, None, top_k=6, score_func="softmax", group_score="max", norm_topk_prob=False)


@needs_c
def test_cpu_bfloat16_and_all_experts_chosen():
    logits, bias = _inputs(33, 64, seed=5, dtype=torch.bfloat16)
    assert_matches_reference("cpu", logits, bias, top_k=6, n_group=8, topk_group=3)
    assert_matches_reference("cpu", logits, bias, top_k=64)  # K = E: every expert, in order
    assert_matches_reference("cpu", logits, bias, top_k=8, n_group=64, topk_group=8)  # one expert per group: score = its max


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "make",
    [lambda b: b.t(), lambda b: b[:, ::2], lambda b: b[3:40:2, 5:165], lambda b: b[:1].expand(9, -1)],
    ids=["transposed", "strided-experts", "sliced", "broadcast-rows"],
)
def test_non_contiguous_logits(backend, make):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(320, 320, generator=g)
    logits = make(base)
    e = logits.shape[1]
    bias = torch.rand(e, generator=g) - 0.8
    assert not logits.is_contiguous()
    assert_matches_reference(backend, logits, bias, top_k=8, n_group=8, topk_group=4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_negative_biases_mask_dropped_groups_with_minus_inf(backend):
    """All biased scores negative: a 0.0 mask would make the dropped groups' experts the best."""
    logits = torch.full((2, 8), -6.0)
    logits[:, 0] = -5.0  # group 0 wins
    bias = torch.full((8,), -1.0)
    w, ids = ops.moe_route(logits, bias, top_k=2, n_group=4, topk_group=1, backend=backend)
    assert ids.tolist() == [[0, 1], [0, 1]]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_minus_inf_bias_disables_experts(backend, n_group, topk_group):
    """A -inf bias takes an expert out of selection. With K as large as the kept groups allow, some picks
    are -inf; the reference orders those (and the dropped groups' -inf experts) by index, and so must the
    kernels, without ever picking an expert twice."""
    logits, bias = _inputs(50, 16, seed=9)
    bias[::3] = float("-inf")
    assert_matches_reference(backend, logits, bias, top_k=topk_group * (16 // n_group), n_group=n_group, topk_group=topk_group)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    w, ids, counts = ops.moe_route(torch.empty(0, 64), None, top_k=4, n_group=8, topk_group=2, return_counts=True,
                                   backend=backend)
    assert w.shape == (0, 4) and ids.shape == (0, 4) and torch.equal(counts, torch.zeros(64, dtype=torch.int32))


# ----------------------------------------------------------------------------------------------------
# Dispatch: forward-only kernels, the requires_grad fallback, and what the kernels reject


def _args(logits, bias=None, k=8, g=8, tg=4):
    return (logits, bias, k, g, tg, "sigmoid", "top2_sum", True, 1.0)


def test_requires_grad_falls_back_to_the_reference_and_differentiates():
    logits, bias = _inputs(5, 64, seed=1)
    logits.requires_grad_(True)
    assert ops.MOE_ROUTE.select("auto", *_args(logits, bias))[0] == "reference"
    w, _ = ops.moe_route(logits, bias, top_k=8, n_group=8, topk_group=4)
    w.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    for backend in CPU_BACKENDS:
        with pytest.raises(r1kernels.BackendUnavailable, match="forward-only"):
            ops.moe_route(logits, bias, top_k=8, n_group=8, topk_group=4, backend=backend)
    with torch.no_grad():
        want = "cpu" if _C is not None else "reference"
        assert ops.MOE_ROUTE.select("auto", *_args(logits, bias))[0] == want
        for backend in CPU_BACKENDS:
            assert_matches_reference(backend, logits, bias, top_k=8, n_group=8, topk_group=4)


@needs_c
def test_auto_picks_cpu_for_cpu_tensors():
    logits, bias = _inputs(4, 64, seed=2)
    assert ops.MOE_ROUTE.select("auto", *_args(logits, bias))[0] == "cpu"
    assert ops.MOE_ALIGN.select("auto", torch.zeros(2, 2, dtype=torch.int32), 4, 16)[0] == "reference"


def test_triton_rejects_what_it_cannot_hold():
    with pytest.raises(r1kernels.BackendUnavailable, match="tile of at most 4096"):
        ops.moe_route(torch.zeros(2, 8192), None, top_k=2, backend="triton")
    with pytest.raises(r1kernels.BackendUnavailable, match=r"top_k=65 must be in \[1, min\(64"):
        ops.moe_route(torch.zeros(2, 128), None, top_k=65, backend="triton")
    with pytest.raises(r1kernels.BackendUnavailable, match="cuda"):
        ops.moe_route(torch.zeros(2, 8), None, top_k=2, backend="cuda")


def test_public_errors_name_the_argument():
    with pytest.raises(ValueError, match="topk_group=5 must be in"):
        ops.moe_route(torch.zeros(2, 16), None, top_k=2, n_group=4, topk_group=5, backend="triton")
    with pytest.raises(ValueError, match=r"top_k=9 must be in \[1, 8\]"):
        ops.moe_route(torch.zeros(2, 16), None, top_k=9, n_group=4, topk_group=2, backend="triton")
    with pytest.raises(ValueError, match="score_func must be"):
        ops.moe_route(torch.zeros(2, 16), None, top_k=2, score_func="relu", backend="triton")


@needs_c
def test_custom_op_errors_opcheck_and_compile():
    with pytest.raises(ValueError, match=r"top_k=9 must be in \[1, topk_group \* E / n_group = 8\]"):
        moe_route_native(torch.zeros(2, 16), None, 9, 4, 2, "sigmoid", "top2_sum", True, 1.0)
    with pytest.raises(ValueError, match="bias must be float32 \\[16\\]"):
        moe_route_native(torch.zeros(2, 16), torch.zeros(8), 2, 4, 2, "sigmoid", "top2_sum", True, 1.0)
    with pytest.raises(ValueError, match="router_logits must be float32 / float16 / bfloat16, got float64"):
        moe_route_native(torch.zeros(2, 16, dtype=torch.float64), None, 2, 4, 2, "sigmoid", "top2_sum", True, 1.0)
    logits, bias = _inputs(6, 64, seed=3)
    torch.library.opcheck(torch.ops.r1kernels.moe_route_native.default, _args(logits, bias))
    torch.library.opcheck(torch.ops.r1kernels.moe_route_native.default, _args(logits.t().contiguous().t(), None, 6, 1, 1))

    torch._dynamo.reset()

    def f(x, b):
        w, ids, counts = ops.moe_route(x, b, top_k=8, n_group=8, topk_group=4, return_counts=True, backend="cpu")
        return w * 2, ids, counts

    w, ids, counts = torch.compile(f, fullgraph=True)(logits, bias)
    w_ref, ids_ref, counts_ref = reference.moe_route(logits, bias, top_k=8, n_group=8, topk_group=4, return_counts=True)
    assert torch.equal(ids, ids_ref) and torch.equal(counts, counts_ref)
    torch.testing.assert_close(w, w_ref * 2, **W_TOL)


@needs_c
def test_cpu_thread_count_does_not_change_results():
    logits, bias = _inputs(500, 256, seed=4)
    outs = []
    for nt in (1, 2, 3):
        w = torch.empty(500, 8)
        ids = torch.empty(500, 8, dtype=torch.int32)
        counts = torch.zeros(256, dtype=torch.int32)
        _C.moe_route_cpu(logits.data_ptr(), bias.data_ptr(), w.data_ptr(), ids.data_ptr(), counts.data_ptr(), 500, 256,
                         256, 1, 8, 4, 8, 0, False, True, True, 2.5, num_threads=nt)
        outs.append((w, ids, counts))
    for w, ids, counts in outs[1:]:
        assert torch.equal(w, outs[0][0]) and torch.equal(ids, outs[0][1]) and torch.equal(counts, outs[0][2])


@needs_c
def test_native_argument_checks():
    logits = torch.randn(4, 16)
    bias = torch.zeros(16)
    w, ids, counts = torch.empty(4, 2), torch.empty(4, 2, dtype=torch.int32), torch.zeros(16, dtype=torch.int32)
    good = dict(logits=logits.data_ptr(), bias=bias.data_ptr(), weights=w.data_ptr(), expert_ids=ids.data_ptr(),
                counts=counts.data_ptr(), n_tokens=4, n_experts=16, stride_t=16, stride_e=1, n_group=4, topk_group=2,
                top_k=2, dtype=0, softmax=False, top2_sum=True, norm=True, scale=1.0)
    _C.moe_route_cpu(**good)
    assert torch.equal(ids, reference.moe_route(logits, bias, top_k=2, n_group=4, topk_group=2)[1])
    cases = [
        (dict(dtype=7), r"dtype must be 0 \(float32\), 1 \(float16\) or 2 \(bfloat16\), got 7"),
        (dict(n_tokens=-1), "n_tokens must be >= 0, got -1"),
        (dict(n_experts=0), "n_experts must be in"),
        (dict(n_group=3), r"n_group must be >= 1 and divide n_experts \(16\), got 3"),
        (dict(topk_group=5), r"topk_group must be in \[1, n_group=4\], got 5"),
        (dict(top_k=9), r"top_k must be in \[1, topk_group \* n_experts / n_group = 8\], got 9"),
        (dict(stride_e=-1), "stride_e must be >= 0"),
        (dict(scale=float("inf")), "scale must be a finite float32"),
        (dict(logits=0), "logits is a null pointer"),
        (dict(weights=0), "weights is a null pointer"),
        (dict(counts=counts.data_ptr() + 2), r"counts must be aligned to its element size \(4 bytes"),
        (dict(weights=logits.data_ptr()), "weights must not overlap logits"),
        (dict(counts=ids.data_ptr()), "counts must not overlap expert_ids"),
        (dict(n_tokens=2**61), "address more memory than exists"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            _C.moe_route_cpu(**{**good, **change})
    # The CUDA entry checks its own limits before it touches the runtime (so this runs without a GPU).
    # Every buffer sized for the claimed n_experts and kept alive, so only the limit under test can fail.
    big, big_bias, big_counts = torch.zeros(1024), torch.zeros(1024), torch.zeros(1024, dtype=torch.int32)
    big_args = {"n_group": 1, "topk_group": 1, "logits": big.data_ptr(), "bias": big_bias.data_ptr(),
                "counts": big_counts.data_ptr()}
    with pytest.raises(ValueError, match="n_experts must be <= 512"):
        _C.moe_route_cuda(**{**good, **big_args, "n_experts": 1024, "stride_t": 1024}, device=0, stream=0)
    with pytest.raises(ValueError, match="experts per group"):
        _C.moe_route_cuda(**{**good, **big_args, "n_experts": 128, "stride_t": 128}, device=0, stream=0)


# ----------------------------------------------------------------------------------------------------
# GPU (the device suite)


def _cuda_backends():
    out = ["triton"]
    why = _native.cuda_device_reason(torch.device("cuda", torch.cuda.current_device()))
    if why is None:
        out.append("cuda")
    return out


GPU_SHAPES = [(8, 1), (16, 4), (64, 8), (72, 8), (160, 8), (256, 8), (384, 8), (512, 8), (512, 16), (96, 96)]


# (dtype, score_func, group_score, ties, norm): a few variants per shape, so that the Triton compiles stay few.
GPU_VARIANTS = [
    (torch.float32, "sigmoid", "top2_sum", False, True),
    (torch.float32, "softmax", "max", False, False),
    (torch.bfloat16, "sigmoid", "top2_sum", True, True),
    (torch.float16, "sigmoid", "max", True, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("e,n_group", GPU_SHAPES)
def test_gpu_matches_reference(e, n_group):
    """E not a power of two (72, 160, 384: 48 per group), 512 (64 per group) and one expert per group."""
    topk_group, k = _groups(e, n_group)
    for backend, (dtype, sf, gs, ties, norm) in itertools.product(_cuda_backends(), GPU_VARIANTS):
        logits, bias = _inputs(1000, e, seed=e + n_group, dtype=dtype, device="cuda", ties=ties)
        assert_matches_reference(backend, logits, bias, top_k=k, n_group=n_group, topk_group=topk_group, score_func=sf,
               group_score=gs, norm_topk_prob=norm)


@pytest.mark.gpu
def test_gpu_large_batch_strides_and_stream():
    logits, bias = _inputs(16384, 256, seed=7, device="cuda")
    for backend in _cuda_backends():
        assert_matches_reference(backend, logits, bias, top_k=8, n_group=8, topk_group=4)
        assert_matches_reference(backend, logits.t().contiguous().t(), bias, top_k=8, n_group=8, topk_group=4)
        assert_matches_reference(backend, logits[:1].expand(5, -1), None, top_k=8)
        b = bias.clone()
        b[::3] = float("-inf")
        assert_matches_reference(backend, logits[:100], b, top_k=32, n_group=8, topk_group=1)  # -inf picks, in index order
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            x = logits * 0.5
            w, ids, counts = ops.moe_route(x, bias, top_k=8, n_group=8, topk_group=4, return_counts=True, backend=backend)
        s.synchronize()
        w_ref, ids_ref, counts_ref = reference.moe_route(x, bias, top_k=8, n_group=8, topk_group=4, return_counts=True)
        assert torch.equal(ids, ids_ref) and torch.equal(counts, counts_ref)


@pytest.mark.gpu
def test_gpu_dispatch():
    logits, bias = _inputs(4, 256, seed=8, device="cuda")
    first = _cuda_backends()[-1]
    assert ops.MOE_ROUTE.select("auto", *_args(logits, bias))[0] == first
    # Past the CUDA kernel's limits, auto goes to Triton.
    wide = torch.randn(4, 1024, device="cuda")
    assert ops.MOE_ROUTE.select("auto", *_args(wide, None, 8, 8, 4))[0] == "triton"
    assert_matches_reference("triton", wide, None, top_k=8, n_group=8, topk_group=4)
    with torch.no_grad():
        g = logits.clone().requires_grad_(True)
        assert ops.MOE_ROUTE.select("auto", *_args(g, bias))[0] == first
    g = logits.clone().requires_grad_(True)
    assert ops.MOE_ROUTE.select("auto", *_args(g, bias))[0] == "reference"
    if first == "cuda":
        torch.library.opcheck(torch.ops.r1kernels.moe_route_native.default, _args(logits, bias))
