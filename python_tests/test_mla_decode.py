"""Absorbed MLA decode and the latent-cache append: the Triton backend against the reference and naive attention.

Runs on the GPU when there is one, else under the Triton interpreter (conftest sets TRITON_INTERPRET);
bf16 only on the GPU (the interpreter computes garbage for a bf16 tl.dot). Every paged layout has shuffled
page ids, and every cache slot no request owns (the tails of pages, unused pages) holds NaN.
"""
import functools

import pytest
import torch
from conftest import MODEL_ATOL, tol

import r1kernels
from r1kernels import ops, reference
from r1kernels.triton.mla_decode import decode_blocks
from r1kernels.triton.mla_decode import mla_decode as triton_mla_decode

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERP_DTYPES = [torch.float32, torch.float16]


def _paged(lens, c, page, dtype, seed, spare=3, extra_cols=1):
    """A NaN-filled cache ``[N, P, C]`` holding random rows for requests of ``lens`` tokens.

    Page ids are a random permutation; ``spare`` pages nobody owns and ``extra_cols`` block-table columns per
    request past what it needs (pointing at unowned pages) make sure only owned slots are ever read.
    Returns (kv, block_table, rows) with rows[b] the ``[lens[b], C]`` rows of request b in position order.
    """
    g = torch.Generator().manual_seed(seed)
    m = max([-(-n // page) for n in lens] + [0]) + extra_cols
    n_pages = len(lens) * m + spare
    perm = torch.randperm(n_pages, generator=g)
    table = perm[: len(lens) * m].view(len(lens), m).to(torch.int32)
    kv = torch.full((n_pages, page, c), float("nan"), dtype=dtype)
    rows = []
    for b, n in enumerate(lens):
        r = torch.randn(n, c, generator=g).to(dtype)
        pos = torch.arange(n)
        kv[table[b, pos // page].long(), pos % page] = r
        rows.append(r)
    return kv.to(DEV), table.to(DEV), rows


def _naive(q, rows, sq, scale, causal, v):
    """Attention over expanded keys / values in fp64, one request and head at a time."""
    b, _, h, _ = q.shape
    out = torch.zeros(b, sq, h, v, dtype=torch.float64)
    lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float64)
    for i, r in enumerate(rows):
        n = r.shape[0]
        k = r.double()
        for j in range(sq):
            seen = (n - sq + j + 1) if causal else n
            seen = max(0, min(seen, n))
            if seen == 0:
                continue
            s = q[i, j].double().cpu() @ k[:seen].T * scale  # [H, seen]
            out[i, j] = s.softmax(-1) @ k[:seen, :v]
            lse[i, :, j] = s.logsumexp(-1)
    return out, lse


def assert_matches_reference(lens, *, sq, h, c, v, page, dtype, causal=True, scale=0.125, seed=0, num_splits=None, naive=True):
    kv, table, rows = _paged(lens, c, page, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(lens), sq, h, c, generator=g).to(dtype=dtype, device=DEV)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    if num_splits is None:
        out, lse = ops.mla_decode(q, kv, table, seqlens, softmax_scale=scale, causal=causal, head_dim_v=v,
                                  backend="triton")
    else:
        out, lse = triton_mla_decode(q, kv, table, seqlens, scale, causal, v, num_splits=num_splits)
    assert out.shape == (len(lens), sq, h, v) and out.dtype == dtype
    assert lse.shape == (len(lens), h, sq) and lse.dtype == torch.float32
    assert torch.isfinite(out).all(), "a NaN from an unused slot (or 0/0) reached the output"
    ref_out, ref_lse = reference.mla_decode(q, kv, table, seqlens, softmax_scale=scale, causal=causal, head_dim_v=v)
    torch.testing.assert_close(out, ref_out, **tol(dtype))
    torch.testing.assert_close(lse, ref_lse, **tol(torch.float32))  # -inf where a row sees nothing, on both sides
    if naive:
        want_out, want_lse = _naive(q, rows, sq, scale, causal, v)
        torch.testing.assert_close(out.cpu().double(), want_out, **tol(dtype), check_dtype=False)
        torch.testing.assert_close(lse.cpu().double(), want_lse, **tol(torch.float32), check_dtype=False)
    return out, lse


# --------------------------------------------------------------------------------------------------------
# Decode


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("sq", [1, 2, 4])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("h", [1, 4, 16])
def test_decode_matches_reference_and_naive(dtype, page, sq, causal, h):
    # 0: empty request; 1: with Sq > 1 and causal, the first queries see nothing (out 0, lse -inf);
    # 17 and 129: tiles and pages cut mid-way.
    lens = [0, 1, 17, 129] if causal else [0, max(1, sq), 17, 129]
    assert_matches_reference(lens, sq=sq, h=h, c=48, v=32, page=page, dtype=dtype, causal=causal, seed=sq * 7 + h)


@pytest.mark.parametrize("sq", [1, 4])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_long_request(sq, num_splits):
    """Length 1000 (small dims) next to a short one; the splits of the long one are all busy."""
    assert_matches_reference([1000, 5], sq=sq, h=4, c=32, v=16, page=16, dtype=torch.float32, seed=11, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 16])
def test_split_merge(num_splits):
    """More splits than some requests have tiles: empty splits must carry lse -inf and no weight."""
    assert_matches_reference([0, 1, 65, 200, 130], sq=2, h=4, c=48, v=32, page=16, dtype=torch.float32, seed=num_splits,
           num_splits=num_splits)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("sq", [1, 2])
def test_v3_dims(dtype, sq):
    """C = 576 = 512 + 64, values the first 512 columns, page 64, at small lengths."""
    assert_matches_reference([0, 3, 70], sq=sq, h=16, c=576, v=512, page=64, dtype=dtype, seed=sq, naive=dtype == torch.float32)


@pytest.mark.parametrize("c,v", [(48, 48), (40, 24), (80, 64)], ids=["no-rest", "odd-widths", "tiny-preset"])
def test_other_widths(c, v):
    """Values as wide as the row (no rope part), widths that are not powers of two, the tiny preset's 64 + 16."""
    assert_matches_reference([3, 33], sq=2, h=4, c=c, v=v, page=16, dtype=torch.float32, seed=c)


def test_strided_inputs():
    """Views with gaps: q sliced from a wider tensor, the cache one layer of a 4-d buffer with padded rows,
    a block table taken every other column, cache_seqlens with a stride."""
    lens, c, v, page, h, sq = [5, 40], 48, 32, 16, 4, 2
    kv, table, _ = _paged(lens, c, page, torch.float32, seed=5)
    buf = torch.full((2, kv.shape[0], page, c + 16), float("nan"), device=DEV)
    buf[1, :, :, :c] = kv
    kv_view = buf[1, :, :, :c]
    wide_table = torch.full((2, 2 * table.shape[1]), -1, dtype=torch.int32, device=DEV)
    wide_table[:, ::2] = table
    table_view = wide_table[:, ::2]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, h, sq, c + 8, generator=g).to(DEV)[..., :c].transpose(1, 2)  # [B, Sq, H, C], gaps
    seqlens = torch.tensor([lens[0], 0, lens[1], 0], dtype=torch.int32, device=DEV)[::2]
    assert not (kv_view.is_contiguous() or table_view.is_contiguous() or q.is_contiguous())
    for splits in (1, 3):
        out, lse = triton_mla_decode(q, kv_view, table_view, seqlens, 0.2, True, v, num_splits=splits)
        ref_out, ref_lse = reference.mla_decode(q.contiguous(), kv, table, seqlens.contiguous(), softmax_scale=0.2,
                                                causal=True, head_dim_v=v)
        torch.testing.assert_close(out, ref_out, **tol(torch.float32))
        torch.testing.assert_close(lse, ref_lse, **tol(torch.float32))


def test_all_empty_and_degenerate_shapes():
    kv = torch.full((2, 16, 48), float("nan"), device=DEV)
    table = torch.tensor([[0], [1]], dtype=torch.int32, device=DEV)
    zeros = torch.zeros(2, dtype=torch.int32, device=DEV)
    q = torch.randn(2, 3, 4, 48, device=DEV)
    for splits in (1, 4):
        out, lse = triton_mla_decode(q, kv, table, zeros, 1.0, True, 32, num_splits=splits)
        assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    # A block table with no columns (nothing can be cached) and an empty batch: no launch, same answers.
    out, lse = triton_mla_decode(q, kv, table[:, :0], zeros, 1.0, True, 32)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    out, lse = triton_mla_decode(q[:0], kv, table[:0], zeros[:0], 1.0, True, 32)
    assert out.shape == (0, 3, 4, 32) and lse.shape == (0, 4, 3)


def test_num_splits_depend_on_shapes_only():
    """The split count is a function of shapes (never of cache_seqlens), at least 1, at most the tiles."""
    cfg = decode_blocks(batch=2, rows=8, width_v=32, width_rest=16, max_positions=16, device=torch.device("cpu"))
    assert cfg["num_splits"] == 1  # 16 positions fit one tile: nothing to split
    cfg = decode_blocks(batch=1, rows=8, width_v=32, width_rest=16, max_positions=4096, device=torch.device("cpu"))
    assert cfg["num_splits"] > 1
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        triton_mla_decode(torch.zeros(1, 1, 1, 32, device=DEV), torch.zeros(1, 16, 32, device=DEV),
                          torch.zeros(1, 1, dtype=torch.int32, device=DEV),
                          torch.ones(1, dtype=torch.int32, device=DEV), 1.0, True, 16, num_splits=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter switch")
def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kv = torch.zeros(1, 16, 8)
    with pytest.raises(r1kernels.BackendUnavailable, match="TRITON_INTERPRET=1 is not set"):
        ops.mla_decode(torch.zeros(1, 1, 1, 8), kv, torch.zeros(1, 1, dtype=torch.int32),
                       torch.ones(1, dtype=torch.int32), softmax_scale=1.0, head_dim_v=4, backend="triton")


# --------------------------------------------------------------------------------------------------------
# Cache append


def _append_case(lens_before, s, l, r, page, cache_dtype, src_dtype, seed, layout):
    g = torch.Generator().manual_seed(seed)
    b = len(lens_before)
    m = max(-(-(n + s) // page) for n in lens_before) + 1
    n_pages = b * m + 2
    table = torch.randperm(n_pages, generator=g)[: b * m].view(b, m).to(torch.int32)
    kv = torch.full((n_pages, page, l + r), float("nan"), dtype=cache_dtype)
    if layout == "module":  # like MLA: both halves are views of one [B, S, L + R + pad] projection
        src = torch.randn(b, s, l + r + 8, generator=g).to(src_dtype)
        c_kv, k_pe = src[..., :l], src[..., l:l + r]
    elif layout == "transposed":  # batch and token dims swapped in memory, k_pe with a column stride of 2
        c_kv = torch.randn(s, b, l, generator=g).to(src_dtype).transpose(0, 1)
        k_pe = torch.randn(b, s, 2 * r, generator=g).to(src_dtype)[..., ::2]
    else:
        c_kv = torch.randn(b, s, l, generator=g).to(src_dtype)
        k_pe = torch.randn(b, s, r, generator=g).to(src_dtype)
    seqlens = torch.tensor(lens_before, dtype=torch.int32)
    return [t.to(DEV) for t in (kv, table, seqlens, c_kv, k_pe)]


@pytest.mark.parametrize("layout", ["contiguous", "module", "transposed"])
@pytest.mark.parametrize("lens_before,s,page", [([0, 15, 30, 5], 3, 16), ([0, 60, 7], 20, 16), ([62, 0], 5, 64),
                                                ([3, 100], 300, 64)],
                         ids=["cross-16", "multi-page", "cross-64", "many-tokens"])
def test_cache_append_matches_reference(lens_before, s, page, layout):
    kv, table, seqlens, c_kv, k_pe = _append_case(lens_before, s, 24, 8, page, torch.float32, torch.float32,
                                                  seed=s, layout=layout)
    if layout != "contiguous":
        assert not (c_kv.is_contiguous() and k_pe.is_contiguous())
    want = kv.clone()
    reference.mla_cache_append(want, table, seqlens, c_kv, k_pe)
    ops.mla_cache_append(kv, table, seqlens, c_kv, k_pe, backend="triton")
    torch.testing.assert_close(kv, want, atol=0, rtol=0, equal_nan=True)  # same rows written, the rest untouched


@pytest.mark.parametrize("cache_dtype,src_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)],
                         ids=["fp32-into-fp16", "fp16-into-fp32"])
def test_cache_append_casts_to_cache_dtype(cache_dtype, src_dtype):
    kv, table, seqlens, c_kv, k_pe = _append_case([5, 14], 4, 48, 16, 16, cache_dtype, src_dtype, seed=1,
                                                  layout="module")
    want = kv.clone()
    reference.mla_cache_append(want, table, seqlens, c_kv, k_pe)
    ops.mla_cache_append(kv, table, seqlens, c_kv, k_pe, backend="triton")
    torch.testing.assert_close(kv, want, atol=0, rtol=0, equal_nan=True)


def test_cache_append_nothing_to_write():
    kv, table, seqlens, c_kv, k_pe = _append_case([5, 14], 0, 24, 8, 16, torch.float32, torch.float32, seed=2,
                                                  layout="contiguous")
    before = kv.clone()
    ops.mla_cache_append(kv, table, seqlens, c_kv, k_pe, backend="triton")
    torch.testing.assert_close(kv, before, atol=0, rtol=0, equal_nan=True)


def test_append_then_decode_round_trip():
    """Rows appended by the kernel in uneven chunks are what decode attends over (both Triton)."""
    lens, c, v, page, h = [37, 0, 70], 48, 32, 16, 4
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(3, 70, c, generator=g).to(DEV)
    table = torch.randperm(20, generator=g)[:15].view(3, 5).to(torch.int32).to(DEV)
    kv = torch.full((20, page, c), float("nan"), device=DEV)
    seqlens = torch.zeros(3, dtype=torch.int32, device=DEV)
    done = 0
    for chunk in (1, 16, 3, 50):  # every request appends the same count per step; lengths are trimmed below
        ops.mla_cache_append(kv, table, seqlens, rows[:, done:done + chunk, :v], rows[:, done:done + chunk, v:],
                             backend="triton")
        seqlens += chunk
        done += chunk
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(3, 2, h, c, generator=g).to(DEV)
    out, lse = ops.mla_decode(q, kv, table, lens_t, softmax_scale=0.3, causal=True, head_dim_v=v, backend="triton")
    want_out, want_lse = _naive(q, [rows[i, :n].cpu() for i, n in enumerate(lens)], 2, 0.3, True, v)
    torch.testing.assert_close(out.cpu().double(), want_out, **tol(torch.float32), check_dtype=False)
    torch.testing.assert_close(lse.cpu().double(), want_lse, **tol(torch.float32), check_dtype=False)


# --------------------------------------------------------------------------------------------------------
# Integration: the tiny model decoding through the Triton kernels


def test_tiny_model_decodes_token_by_token_through_triton(monkeypatch):
    """The MLA module's absorbed path with the Triton append + decode equals the expanded forward.

    ``use_backend("triton")`` would force every op (some have no Triton backend), so only the two latent-cache
    ops the module calls are pointed at Triton.
    """
    torch.manual_seed(0)
    model = r1kernels.Transformer(r1kernels.ModelConfig.preset("tiny")).to(DEV).eval()
    calls = {"decode": 0, "append": 0}

    def traced(fn, key):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **{**kwargs, "backend": "triton"})
        return run

    monkeypatch.setattr(ops, "mla_decode", traced(ops.mla_decode, "decode"))
    monkeypatch.setattr(ops, "mla_cache_append", traced(ops.mla_cache_append, "append"))
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEV)
    with torch.no_grad():
        full = model(ids)  # expanded form: no cache, no decode op
        assert calls == {"decode": 0, "append": 0}
        cache = model.new_cache(2, 16, page_size=16)
        cache.kv.fill_(float("nan"))  # unwritten slots must never be read
        steps = [model(ids[:, :5], cache=cache)]  # prefill 5 into the empty cache: expanded form, rows appended
        steps.append(model(ids[:, 5:7], cache=cache))  # Sq = 2 new tokens through the absorbed decode
        for t in range(7, 12):  # then one token at a time
            steps.append(model(ids[:, t:t + 1], cache=cache))
    layers = model.config.num_hidden_layers
    assert calls == {"decode": 6 * layers, "append": 7 * layers}
    got = torch.cat(steps, dim=1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, full, atol=MODEL_ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("h", [16, 128])
@pytest.mark.parametrize("sq", [1, 2])
def test_v3_dims_on_gpu(dtype, h, sq):
    assert_matches_reference([0, 1, 257, 2000], sq=sq, h=h, c=576, v=512, page=64, dtype=dtype, seed=h + sq, naive=False)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 4, 64])
def test_v3_dims_bf16_splits_on_gpu(num_splits):
    assert_matches_reference([4096, 1, 300], sq=2, h=128, c=576, v=512, page=64, dtype=torch.bfloat16, seed=9, naive=False,
           num_splits=num_splits)


@pytest.mark.gpu
def test_no_host_sync_on_gpu():
    kv, table, _ = _paged([100, 7], 576, 64, torch.bfloat16, seed=0)
    q = torch.randn(2, 2, 128, 576, device=DEV, dtype=torch.bfloat16)
    seqlens = torch.tensor([98, 5], dtype=torch.int32, device=DEV)
    c_kv = torch.randn(2, 2, 512, device=DEV, dtype=torch.bfloat16)
    k_pe = torch.randn(2, 2, 64, device=DEV, dtype=torch.bfloat16)

    def step():
        ops.mla_cache_append(kv, table, seqlens, c_kv, k_pe, backend="triton")
        return ops.mla_decode(q, kv, table, seqlens + 2, softmax_scale=0.1, head_dim_v=512, backend="triton")

    step()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
