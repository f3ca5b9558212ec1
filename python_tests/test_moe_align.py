"""moe_align's Triton (interpreter here, GPU on the device suite) and CUDA backends against the reference,
exactly: sorted slots (ascending within an expert, sentinel T*K), block experts (-1 past num_padded),
num_padded and counts.

Letters: T tokens, K experts per token, E experts, BM the block size, S_max the padded list's length.
"""
import pytest
import torch

import r1kernels
from r1kernels import _native, ops, reference
from r1kernels.ops._native import moe_align_native

_C = _native.module()


def _ids(t, k, e, *, seed, kind="uniform", dtype=torch.int32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        ids = torch.randint(0, e, (t, k), generator=g)
    elif kind == "skewed":  # most slots on one expert, the rest on a few: most experts get nothing
        ids = torch.where(torch.rand(t, k, generator=g) < 0.7, torch.full((t, k), e - 1),
                          torch.randint(0, min(e, 3), (t, k), generator=g))
    elif kind == "routed":  # distinct experts per token, as moe_route gives
        ids = torch.rand(t, e, generator=g).argsort(dim=1)[:, :k]
    else:
        raise ValueError(kind)
    return ids.to(device=device, dtype=dtype)


def assert_matches_reference(backend, ids, e, bm):
    got = ops.moe_align(ids, e, bm, backend=backend)
    want = reference.moe_align(ids.cpu(), e, bm)
    names = ("sorted_slots", "block_expert", "num_padded", "counts")
    for name, a, b in zip(names, got, want):
        assert a.dtype == torch.int32, name
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.equal(a.cpu(), b), f"{name} differs from the reference"


# (T, K, E): T = 1; E > T*K (most experts empty); K = 1; E not a power of two.
SHAPES = [(1, 1, 4), (1, 8, 256), (3, 2, 64), (7, 3, 5), (64, 6, 64), (300, 8, 256), (97, 4, 160)]


@pytest.mark.parametrize("t,k,e", SHAPES)
@pytest.mark.parametrize("bm", [1, 16, 64, 128])
def test_triton_matches_reference(t, k, e, bm):
    assert_matches_reference("triton", _ids(t, k, e, seed=t * k + e, kind="routed" if k <= e else "uniform"), e, bm)


@pytest.mark.parametrize("kind", ["uniform", "skewed"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_triton_distributions_and_id_dtypes(kind, dtype):
    assert_matches_reference("triton", _ids(200, 8, 64, seed=1, kind=kind, dtype=dtype), 64, 16)


def test_triton_layouts_and_edge_cases():
    ids = _ids(40, 6, 32, seed=2)
    assert_matches_reference("triton", ids.t().contiguous().t(), 32, 16)  # non-contiguous [T, K]
    assert_matches_reference("triton", torch.zeros(5, 3, dtype=torch.int32), 8, 4)  # every slot on expert 0
    assert_matches_reference("triton", torch.full((5, 3), 7, dtype=torch.int32), 8, 128)  # every slot on the last expert
    assert_matches_reference("triton", torch.empty(0, 8, dtype=torch.int32), 16, 64)  # no tokens: S_max = 0


def test_sizes_come_from_the_shapes():
    """S_max and the block count do not depend on the ids (no host sync can be needed)."""
    a = ops.moe_align(torch.zeros(10, 4, dtype=torch.int32), 64, 16, backend="triton")
    b = ops.moe_align(torch.arange(40, dtype=torch.int32).reshape(10, 4), 64, 16, backend="triton")
    assert a[0].shape == b[0].shape == (-(-(40 + 40 * 15) // 16) * 16,)
    assert a[1].shape == b[1].shape == (a[0].shape[0] // 16,)


def test_dispatch_and_errors():
    ids = torch.zeros(2, 2, dtype=torch.int32)
    assert ops.MOE_ALIGN.select("auto", ids, 4, 16)[0] == "reference"  # no CPU kernel for this op
    with pytest.raises(r1kernels.BackendUnavailable, match="there is no 'cpu' backend"):
        ops.moe_align(ids, 4, 16, backend="cpu")
    with pytest.raises(r1kernels.BackendUnavailable, match="cuda"):
        ops.moe_align(ids, 4, 16, backend="cuda")
    with pytest.raises(ValueError, match="num_experts and block_size must be positive"):
        ops.moe_align(ids, 4, 0, backend="triton")
    with pytest.raises(TypeError, match="expert_ids must be int32 / int64"):
        ops.moe_align(ids.float(), 4, 16, backend="triton")
    if _C is not None:
        with pytest.raises(ValueError, match="runs on CUDA tensors only"):
            moe_align_native(ids, 4, 16)


@pytest.mark.skipif(_C is None, reason="r1kernels._C is not built")
def test_native_argument_checks():
    """The CUDA entry validates its arguments before it touches the runtime, so this runs without a GPU."""
    i32 = torch.zeros(80, dtype=torch.int32)
    good = dict(expert_ids=i32.data_ptr(), ids_int64=False, n_slots=8, n_experts=4, block_size=16, s_max=80,
                sorted_slots=i32.data_ptr(), block_expert=i32.data_ptr(), num_padded=i32.data_ptr(),
                counts=i32.data_ptr(), workspace=i32.data_ptr(), device=0, stream=0)
    cases = [
        (dict(n_slots=-1), r"n_slots must be in \[0, 2\^31 - 1\), got -1"),
        (dict(n_experts=5000), r"n_experts must be in \[1, 4096\]"),
        (dict(block_size=0), "block_size must be in"),
        (dict(s_max=48), r"s_max must be ceil\(\(n_slots \+ min\(n_experts, n_slots\) \* \(block_size - 1\)\) / "
                         r"block_size\) \* block_size = 80 \(the length of sorted_slots\), got 48"),
        (dict(device=-1), "device must be a CUDA device index >= 0"),
        (dict(expert_ids=0), "expert_ids is a null pointer"),
        (dict(expert_ids=i32.data_ptr() + 4, ids_int64=True), r"expert_ids must be aligned to its element size \(8"),
        (dict(counts=0), "counts is a null pointer"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            _C.moe_align_cuda(**{**good, **change})


# ----------------------------------------------------------------------------------------------------
# GPU (the device suite)


def _cuda_backends():
    out = ["triton"]
    if _native.cuda_device_reason(torch.device("cuda", torch.cuda.current_device())) is None:
        out.append("cuda")
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("t,k,e", SHAPES + [(4096, 8, 256), (16384, 8, 256), (128, 6, 64), (33, 8, 4096)])
@pytest.mark.parametrize("bm", [1, 16, 64, 128])
def test_gpu_matches_reference(t, k, e, bm):
    for backend in _cuda_backends():
        for kind, dtype in (("routed" if k <= e else "uniform", torch.int32), ("skewed", torch.int64)):
            assert_matches_reference(backend, _ids(t, k, e, seed=t + e + bm, kind=kind, dtype=dtype, device="cuda"), e, bm)


@pytest.mark.gpu
def test_gpu_edge_cases_dispatch_and_stream():
    for backend in _cuda_backends():
        assert_matches_reference(backend, torch.empty(0, 8, dtype=torch.int32, device="cuda"), 16, 64)
        assert_matches_reference(backend, torch.zeros(1, 1, dtype=torch.int32, device="cuda"), 256, 128)
        assert_matches_reference(backend, _ids(50, 6, 32, seed=3, device="cuda").t().contiguous().t(), 32, 16)
    ids = _ids(64, 8, 256, seed=4, device="cuda")
    want = "cuda" if "cuda" in _cuda_backends() else "triton"
    assert ops.MOE_ALIGN.select("auto", ids, 256, 64)[0] == want
    assert ops.MOE_ALIGN.select("auto", ids, 8192, 64)[0] == "triton"  # past the CUDA kernel's shared memory
    assert_matches_reference("triton", ids, 8192, 64)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ids2 = (ids + 1) % 256
        got = ops.moe_align(ids2, 256, 64, backend=want)
    s.synchronize()
    for a, b in zip(got, reference.moe_align(ids2.cpu(), 256, 64)):
        assert torch.equal(a.cpu(), b)
    if want == "cuda":
        torch.library.opcheck(torch.ops.r1kernels.moe_align_native.default, (ids, 256, 64))
