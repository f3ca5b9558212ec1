"""The CUDA MLA decode kernel (csrc/cuda/mla.cu, ``r1kernels::mla_decode_native``) against the reference.

GPU tests (``@pytest.mark.gpu``) run the kernel: bf16 and fp16 at DeepSeek-V3 dims (C = 576, Dv = 512), H in
{16, 128}, Sq in {1, 2, 4}, per-request lengths 0, 1, 17, 1000, 4096, pages of 64 and 16 (and others) with
shuffled page ids, every slot no request owns (tails of pages, unowned pages, the pages that block-table
columns past a request's length point at) filled with NaN. The CPU tests check what runs without a GPU:
the dispatch check's reasons, the fake implementation's shapes and the native argument checks.

Letters: B requests, Sq new tokens per request, H heads, C latent width, Dv value width, N pages,
P page size, M pages per request.
"""
import math
import re

import pytest
import torch
from conftest import tol

import r1kernels
from r1kernels import _native, ops, reference
from r1kernels.ops import _native as native_ops
from r1kernels.ops._native import _mla_decode_cuda_check, _mla_decode_problem, mla_decode_native

_C = _native.module()
needs_c = pytest.mark.skipif(_C is None, reason=f"r1kernels._C is not built: {_native.cpu_reason()}")

C, DV = 576, 512
SCALE = 192 ** -0.5  # V3: (qk_nope + qk_rope) ** -0.5
LENS = [0, 1, 17, 1000, 4096]
DTYPES = [torch.bfloat16, torch.float16]


def _paged(lens, page, dtype, device, seed, spare=3, extra_cols=1, width=C):
    """A NaN-filled cache ``[N, P, width]`` holding random rows for requests of ``lens`` tokens.

    Page ids are a random permutation; ``spare`` unowned pages and ``extra_cols`` block-table columns per
    request past what it needs (pointing at NaN pages) check that only owned slots are read.
    """
    g = torch.Generator().manual_seed(seed)
    m = max([-(-n // page) for n in lens] + [0]) + extra_cols
    n_pages = len(lens) * m + spare
    table = torch.randperm(n_pages, generator=g)[: len(lens) * m].view(len(lens), m).to(torch.int32)
    kv = torch.full((n_pages, page, width), float("nan"), dtype=dtype)
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        kv[table[b, pos // page].long(), pos % page] = torch.randn(n, width, generator=g).to(dtype)
    return kv.to(device), table.to(device)


def _problem(lens, *, sq, h, page, dtype, device="cuda", seed=0, **kw):
    kv, table = _paged(lens, page, dtype, device, seed, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(lens), sq, h, C, generator=g).to(dtype=dtype, device=device)
    return q, kv, table, torch.tensor(lens, dtype=torch.int32, device=device)


def assert_matches_reference(q, kv, table, lens, *, causal=True, num_splits=None, kv_view=None):
    """The kernel (by ops.mla_decode with backend="cuda", or the custom op with a forced split count)
    against the reference; ``kv_view``: run the kernel on this view of the cache instead."""
    kv_k = kv if kv_view is None else kv_view
    if num_splits is None:
        out, lse = ops.mla_decode(q, kv_k, table, lens, softmax_scale=SCALE, causal=causal, head_dim_v=DV,
                                  backend="cuda")
    else:
        out, lse = mla_decode_native(q, kv_k, table, lens, SCALE, causal, DV, num_splits)
    b, sq, h, _ = q.shape
    assert out.shape == (b, sq, h, DV) and out.dtype == q.dtype
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32
    assert torch.isfinite(out).all(), "a NaN from an unused slot (or 0/0) reached the output"
    ref_out, ref_lse = reference.mla_decode(q, kv, table, lens, softmax_scale=SCALE, causal=causal, head_dim_v=DV)
    torch.testing.assert_close(out, ref_out, **tol(q.dtype))
    torch.testing.assert_close(lse, ref_lse, **tol(torch.float32))  # -inf where a row sees nothing, on both sides
    return out, lse


def _needs_cuda_part():
    if _C is None:
        pytest.skip(f"r1kernels._C is not built: {_native.cpu_reason()}")
    why = _native.cuda_device_reason(torch.device("cuda", torch.cuda.current_device()))
    if why is not None:
        pytest.skip(why)


# ----------------------------------------------------------------------------------------------------
# GPU: the kernel against the reference


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h", [16, 128])
@pytest.mark.parametrize("sq", [1, 2, 4])
@pytest.mark.parametrize("page", [64, 16])
def test_cuda_matches_reference(dtype, h, sq, page):
    _needs_cuda_part()
    q, kv, table, lens = _problem(LENS, sq=sq, h=h, page=page, dtype=dtype, seed=sq * 1000 + h + page)
    out, lse = assert_matches_reference(q, kv, table, lens)
    # Length 0 and, with Sq > 1, the queries of a length-1 request that precede its only token see nothing.
    assert out[0].eq(0).all() and lse[0].eq(float("-inf")).all()
    if sq > 1:
        assert out[1, : sq - 1].eq(0).all() and lse[1, :, : sq - 1].eq(float("-inf")).all()
        assert torch.isfinite(lse[1, :, sq - 1]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_forced_split_counts(num_splits, dtype):
    """One split writes the output directly; more go through the workspace and the merge kernel, including
    splits that get no token (64 splits of a 17-token request) and a 64-token request in 64 splits."""
    _needs_cuda_part()
    q, kv, table, lens = _problem([17, 4096, 0, 64, 1000, 1], sq=2, h=128, page=64, dtype=dtype, seed=num_splits)
    assert_matches_reference(q, kv, table, lens, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("sq", [1, 3])
def test_cuda_not_causal(sq):
    _needs_cuda_part()
    q, kv, table, lens = _problem([5, 300, 2049, 0], sq=sq, h=16, page=64, dtype=torch.bfloat16, seed=7)
    assert_matches_reference(q, kv, table, lens, causal=False)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [1, 48, 80, 256])
def test_cuda_other_page_sizes_and_strided_cache(page):
    """Any page size; a cache that is a view of wider rows (row stride 640, not C) is read in place."""
    _needs_cuda_part()
    lens = [1, 33, 500, 1234]
    q, kv_wide, table, seqlens = _problem(lens, sq=2, h=16, page=page, dtype=torch.bfloat16, seed=page, width=640)
    kv = kv_wide[:, :, :C]
    assert not kv.is_contiguous()
    assert_matches_reference(q, kv.contiguous(), table, seqlens, kv_view=kv)
    # A strided q (a slice along H) and a transposed block table are copied by the op, with the same result.
    q2 = torch.randn(4, 2, 32, C, device="cuda", dtype=torch.bfloat16)[:, :, ::2]
    t2 = table.t().contiguous().t()
    assert_matches_reference(q2, kv.contiguous(), t2, seqlens)


@pytest.mark.gpu
def test_cuda_large_batch_one_split_and_scheduling():
    """B * ceil(Sq * H / 64) CTAs fill the device: the split count from the shapes is 1 (no merge); small
    batches get several, from the shapes only."""
    _needs_cuda_part()
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(0, 700, (96,), generator=g).tolist()
    q, kv, table, seqlens = _problem(lens, sq=1, h=128, page=64, dtype=torch.bfloat16, seed=3)
    dev = torch.cuda.current_device()
    m, p = table.shape[1], kv.shape[1]
    assert _C.mla_decode_cuda_num_splits(96, 128, m * p, dev) == 1
    assert 1 < _C.mla_decode_cuda_num_splits(2, 16, 64 * 4096, dev) <= 64
    assert _C.mla_decode_cuda_num_splits(2, 16, 32, dev) == 1  # too short to split
    assert_matches_reference(q, kv, table, seqlens)


@pytest.mark.gpu
def test_cuda_no_host_sync_and_side_stream():
    _needs_cuda_part()
    q, kv, table, lens = _problem([100, 4096, 0], sq=2, h=128, page=64, dtype=torch.bfloat16, seed=11)
    want = ops.mla_decode(q, kv, table, lens, softmax_scale=SCALE, backend="cuda")  # warm-up (memoised checks)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = ops.mla_decode(q, kv, table, lens, softmax_scale=SCALE, backend="cuda")
        got_auto = ops.mla_decode(q, kv, table, lens, softmax_scale=SCALE)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got_auto[0], want[0])
    # A side stream: the kernel runs on the stream current at the call, after the producer of q.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q2 = q * 2
        out2, lse2 = ops.mla_decode(q2, kv, table, lens, softmax_scale=SCALE, backend="cuda")
    s.synchronize()
    ref_out, ref_lse = reference.mla_decode(q2, kv, table, lens, softmax_scale=SCALE)
    torch.testing.assert_close(out2, ref_out, **tol(torch.bfloat16))
    torch.testing.assert_close(lse2, ref_lse, **tol(torch.float32))


@pytest.mark.gpu
def test_cuda_dispatch_opcheck_and_compile():
    _needs_cuda_part()
    q, kv, table, lens = _problem([3, 70, 0], sq=2, h=16, page=16, dtype=torch.bfloat16, seed=5)
    kv = torch.nan_to_num(kv)  # opcheck compares runs of the op; keep every value finite
    args = (q, kv, table, lens, SCALE, True, DV)
    assert ops.MLA_DECODE.select("auto", *args)[0] == "cuda"
    # What the kernel does not take goes to another backend under "auto" and raises when forced.
    q64 = q[..., :64].contiguous()
    for other, match in [
        ((q.float(), kv.float(), table, lens, SCALE, True, DV), "float16 / bfloat16"),
        ((q64, kv[..., :64].contiguous(), table, lens, SCALE, True, 32), "C = 576"),
        ((q, kv, table, lens, SCALE, True, 256), "head_dim_v = 512"),
        ((q.clone().requires_grad_(True), kv, table, lens, SCALE, True, DV), "forward-only"),
    ]:
        assert ops.MLA_DECODE.select("auto", *other)[0] != "cuda"
        with pytest.raises(r1kernels.BackendUnavailable, match=match):
            ops.MLA_DECODE("cuda", *other)
    torch.library.opcheck(torch.ops.r1kernels.mla_decode_native.default, args)
    torch.library.opcheck(torch.ops.r1kernels.mla_decode_native.default, args[:6] + (DV, 3))
    torch._dynamo.reset()
    f = torch.compile(lambda *a: torch.ops.r1kernels.mla_decode_native(*a)[0] * 2, fullgraph=True)
    ref_out, _ = reference.mla_decode(q, kv, table, lens, softmax_scale=SCALE)
    torch.testing.assert_close(f(*args), ref_out * 2, **tol(torch.bfloat16))


@pytest.mark.gpu
def test_cuda_launch_errors_are_exceptions():
    _needs_cuda_part()
    q, kv, table, lens = _problem([5], sq=1, h=16, page=16, dtype=torch.bfloat16, seed=1)
    out = torch.empty(1, 1, 16, DV, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(1, 16, 1, device="cuda")
    args = [q.data_ptr(), kv.data_ptr(), table.data_ptr(), lens.data_ptr(), out.data_ptr(), lse.data_ptr(), 0, 0,
            1, 1, 16, C, DV, kv.shape[0], 16, table.shape[1], 16 * C, C, table.shape[1], 1, 2, True, SCALE]
    with pytest.raises(RuntimeError, match="cudaSetDevice|invalid device"):
        _C.mla_decode_cuda(*args, device=torch.cuda.device_count(), stream=0)
    with pytest.raises(ValueError, match="ws_out"):
        _C.mla_decode_cuda(*args[:19], 2, *args[20:], device=0, stream=0)


# ----------------------------------------------------------------------------------------------------
# CPU: dispatch reasons, the fake implementation, native argument checks


def _meta_args(b=2, sq=1, h=16, c=C, n=8, p=64, m=4, dtype=torch.bfloat16, device="meta"):
    q = torch.empty(b, sq, h, c, dtype=dtype, device=device)
    kv = torch.empty(n, p, c, dtype=dtype, device=device)
    table = torch.zeros(b, m, dtype=torch.int32, device=device)
    lens = torch.zeros(b, dtype=torch.int32, device=device)
    return q, kv, table, lens


def test_cuda_backend_on_cpu_tensors_is_unavailable():
    q, kv, table, lens = _meta_args(device="cpu")
    with pytest.raises(r1kernels.BackendUnavailable, match="backend 'cuda' cannot run this call: .*cuda tensors"):
        ops.mla_decode(q, kv, table, lens, softmax_scale=SCALE, backend="cuda")
    assert _mla_decode_cuda_check(q, kv, table, lens, SCALE, True, DV).startswith("this backend takes cuda tensors")
    if not torch.cuda.is_available():
        assert ops.MLA_DECODE.select("auto", q, kv, table, lens, SCALE, True, DV)[0] == "cpu"  # batched torch path


def test_problem_reasons():
    """The shape / dtype / stride reasons, on meta tensors (no data is needed to decide)."""
    ok = _meta_args()
    assert _mla_decode_problem(*ok, SCALE, DV) is None
    assert _mla_decode_problem(*_meta_args(sq=4, h=128, p=16), SCALE, DV) is None
    assert _mla_decode_problem(*_meta_args(p=1), SCALE, DV) is None
    assert _mla_decode_problem(*_meta_args(dtype=torch.float16, p=48), SCALE, DV) is None
    q, kv, table, lens = ok
    cases = [
        ((q.float(), kv.float(), table, lens, SCALE, DV), "float16 / bfloat16, got q of dtype float32"),
        ((q[..., :64], kv[..., :64], table, lens, SCALE, DV), r"C = 576 \(q.shape\[-1\]\), got C=64"),
        ((q, kv, table, lens, SCALE, 128), "head_dim_v = 512, got 128"),
        ((q, kv.half(), table, lens, SCALE, DV), "kv_cache must have q's dtype bfloat16, got float16"),
        ((q, kv, table.long(), lens, SCALE, DV), "block_table must be int32"),
        ((q, kv, table[:1], lens, SCALE, DV), r"block_table must be int32 \[2, M\]"),
        ((q, kv, table, lens[:1], SCALE, DV), r"cache_seqlens must be int32 \[2\]"),
        ((q[0], kv, table, lens, SCALE, DV), r"q must be \[B, Sq, H, C\]"),
        ((q, torch.empty(8, 64, 584, dtype=torch.bfloat16, device="meta")[:, :, 4:580], table, lens, SCALE, DV),
         "16-byte boundaries"),
        ((q, torch.empty(8, 64, 580, dtype=torch.bfloat16, device="meta")[:, :, :C], table, lens, SCALE, DV),
         "16-byte boundaries"),
        ((q, kv, table, lens, float("inf"), DV), "softmax_scale must be finite"),
        ((*_meta_args(b=70000), SCALE, DV), "at most 65535 requests"),
    ]
    for args, match in cases:
        why = _mla_decode_problem(*args)
        assert why is not None, match
        assert re.search(match, why), (match, why)
    # A view of wider rows with a stride that is a multiple of 8 is fine (read in place).
    wide = torch.empty(8, 64, 640, dtype=torch.bfloat16, device="meta")[:, :, :C]
    assert _mla_decode_problem(q, wide, table, lens, SCALE, DV) is None


def test_fake_impl_shapes():
    for b, sq, h in [(2, 1, 16), (3, 4, 128), (0, 2, 16)]:
        q, kv, table, lens = _meta_args(b=b, sq=sq, h=h)
        out, lse = torch.ops.r1kernels.mla_decode_native(q, kv, table, lens, SCALE, True, DV)
        assert out.shape == (b, sq, h, DV) and out.dtype == torch.bfloat16 and out.device.type == "meta"
        assert lse.shape == (b, h, sq) and lse.dtype == torch.float32
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, kv, table, lens = _meta_args(b=2, sq=2, h=128, dtype=torch.float16, device="cpu")
        out, lse = torch.ops.r1kernels.mla_decode_native(q, kv, table, lens, SCALE, False, DV, 5)
        assert out.shape == (2, 2, 128, DV) and out.dtype == torch.float16 and lse.shape == (2, 128, 2)
    with pytest.raises(ValueError, match="C = 576"):
        torch.ops.r1kernels.mla_decode_native(*_meta_args(c=64), SCALE, True, DV)
    with pytest.raises(ValueError, match="num_splits must be in"):
        torch.ops.r1kernels.mla_decode_native(*_meta_args(), SCALE, True, DV, 65)


@needs_c
def test_custom_op_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA tensors only"):
        mla_decode_native(*_meta_args(device="cpu"), SCALE, True, DV)


@needs_c
def test_native_argument_checks():
    """The bindings check every size, stride and pointer before anything runs (host memory stands in for
    device pointers: nothing dereferences them before the checks fail)."""
    q, kv, table, lens = _meta_args(b=2, sq=1, h=16, device="cpu")
    out = torch.empty(2, 1, 16, DV, dtype=torch.bfloat16)
    lse = torch.empty(2, 16, 1)
    ws_out, ws_lse = torch.empty(3, 2, 16, DV), torch.empty(3, 2, 16)
    good = dict(q=q.data_ptr(), kv=kv.data_ptr(), block_table=table.data_ptr(), cache_seqlens=lens.data_ptr(),
                out=out.data_ptr(), lse=lse.data_ptr(), ws_out=ws_out.data_ptr(), ws_lse=ws_lse.data_ptr(), batch=2,
                sq=1, heads=16, head_dim=C, head_dim_v=DV, num_pages=8, page_size=64, max_pages=4,
                kv_page_stride=64 * C, kv_row_stride=C, bt_stride=4, num_splits=3, dtype=2, causal=True,
                softmax_scale=SCALE, device=0, stream=0)
    cases = [
        (dict(dtype=0), r"dtype must be 1 \(float16\) or 2 \(bfloat16\), got 0"),
        (dict(head_dim=192), "head_dim \\(C\\) must be 576, got 192"),
        (dict(head_dim_v=128), "head_dim_v \\(Dv\\) must be 512, got 128"),
        (dict(batch=70000), r"batch must be in \[0, 65535\]"),
        (dict(sq=-1), "sq must be >= 0"),
        (dict(num_pages=0), "num_pages must be in"),
        (dict(page_size=0), "page_size must be in"),
        (dict(max_pages=2**31), "max_pages must be >= 1"),
        (dict(kv_row_stride=580), "kv_row_stride must be >= head_dim and a multiple of 8"),
        (dict(kv_row_stride=568), "kv_row_stride must be >= head_dim"),
        (dict(kv_page_stride=4), "kv_page_stride must be >= 0 and a multiple of 8"),
        (dict(bt_stride=3), r"bt_stride must be >= max_pages \(4\)"),
        (dict(num_splits=0), r"num_splits must be in \[1, 64\]"),
        (dict(num_splits=65), r"num_splits must be in \[1, 64\]"),
        (dict(softmax_scale=float("nan")), "softmax_scale must be a finite float32"),
        (dict(q=0), "q is a null pointer"),
        (dict(kv=kv.data_ptr() + 2), "kv must be aligned"),
        (dict(q=q.data_ptr() + 8), "q must be aligned"),
        (dict(block_table=0), "block_table is a null pointer"),
        (dict(cache_seqlens=lens.data_ptr() + 2), "cache_seqlens must be aligned"),
        (dict(out=0), "out is a null pointer"),
        (dict(lse=0), "lse is a null pointer"),
        (dict(ws_out=0), "ws_out is a null pointer"),
        (dict(ws_lse=0), "ws_lse is a null pointer"),
        (dict(out=q.data_ptr()), "out must not overlap q"),
        (dict(lse=out.data_ptr()), "lse must not overlap out"),
        (dict(ws_lse=ws_out.data_ptr() + 64), "ws_out must not overlap ws_lse"),
        (dict(device=-1), "device must be a CUDA device index >= 0"),
        (dict(kv_page_stride=2**62), "address more memory than exists"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            _C.mla_decode_cuda(**{**good, **change})
    # One split needs no workspace.
    no_ws = {**good, "num_splits": 1, "ws_out": 0, "ws_lse": 0}
    if not _C.built_with_cuda:
        with pytest.raises(RuntimeError, match="no CUDA part"):
            _C.mla_decode_cuda(**no_ws)
    elif not torch.cuda.is_available():
        # Valid arguments reach the runtime, whose error (no driver / device here) comes back as RuntimeError.
        with pytest.raises(RuntimeError, match="cuda"):
            _C.mla_decode_cuda(**no_ws)
        with pytest.raises(RuntimeError, match="cuda"):
            _C.mla_decode_cuda_num_splits(2, 16, 4096, 0)
    with pytest.raises(ValueError, match="must be >= 0"):
        _C.mla_decode_cuda_num_splits(-1, 16, 4096, 0)
    # Nothing to do needs no valid pointers (and returns before touching the runtime).
    if _C.built_with_cuda:
        _C.mla_decode_cuda(**{**no_ws, "batch": 0, "q": 0, "kv": 16, "out": 0, "lse": 0})


def test_supported_set_constants_match_the_native_module():
    assert (native_ops.MLA_DECODE_CUDA_HEAD_DIM, native_ops.MLA_DECODE_CUDA_HEAD_DIM_V) == (C, DV)
    assert math.isclose(SCALE, 0.07216878364870323)
