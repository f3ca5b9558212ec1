"""Absorbed MLA decode in Triton: the paged latent-cache append and split-KV flash decoding.

Letters:
    B requests, Sq new query tokens per request, H heads, C cache row width (L + R, 576 in V3),
    L = kv_lora_rank (512), R = qk_rope_head_dim (64), V = head_dim_v (the value width, = L in V3),
    N cache pages, P page size, M pages per request (block-table width), S new tokens per request (append).
    A "row" of the decode kernels is one (query token i, head h) pair of a request: r = i * H + h, Sq * H rows.
    Tiles: BLOCK_H rows, BLOCK_N cache positions, BLOCK_V value columns (>= V), BLOCK_R the columns [V, C).

Append (``mla_cache_append``): one program per (request, block of new tokens) writes rows
``[c_kv, k_pe]`` at positions ``cache_seqlens[b] + s`` through the block table.

Decode (``mla_decode``), semantics of ``r1kernels.reference.mla_decode``:

* stage 1, grid ``(cdiv(Sq * H, BLOCK_H), num_splits, B)``: a program takes BLOCK_H rows of one request and
  one split of that request's cache positions. It walks its positions BLOCK_N at a time; each KV tile is
  loaded once and serves all BLOCK_H rows (all heads share the one latent K/V head: that sharing is what
  makes absorbed MQA cheap). q.k is two dots, over the value columns [0, V) and the rest [V, C) (L and R in
  V3); the value columns of the same tile are V, so P.V reuses it. fp32 accumulation, online softmax in base
  2. With one split it writes the final output; otherwise a normalised fp32 partial output and its lse.
  The row blocks are the fastest grid axis: programs launched together then read the same KV tiles, so
  the second and later reads of a tile (H > BLOCK_H) come from L2 rather than HBM.
* stage 2 (more than one split), grid ``(B, cdiv(Sq * H, BLOCK_H), cdiv(V, BLOCK_V))``: merges the splits
  with log-sum-exp weights: out = sum_s exp(lse_s - lse) * out_s, lse = log sum_s exp(lse_s).

No launcher reads device data: ``num_splits`` and every block size come from shapes (and the device's SM
count). The split ranges are derived in the kernel from the request's length, so the work of a request is
spread over all its splits whatever its length; splits that get no positions write out 0 and lse -inf.
Cache rows at positions >= the request's length are never loaded (loads are masked, not just scores: a
NaN in an unused slot would survive 0 * NaN), and a row that sees nothing gives out 0 and lse -inf.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import persistent_programs

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634  # scores are kept in base 2 (exp2 is the hardware exponential)


# --------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _cache_append_kernel(
    kv_ptr,  # [N, P, C] cache pages (written), any strides
    bt_ptr,  # [B, M] int32 block table, any strides
    seqlens_ptr,  # [B] int32 tokens cached per request before the new ones, stride stride_sl
    ckv_ptr,  # [B, S, L] new latents, any strides (cast to the cache dtype)
    kpe_ptr,  # [B, S, R] new rotated keys, any strides (cast to the cache dtype)
    S,  # new tokens per request
    L,  # c_kv width: cache columns [0, L)
    R,  # k_pe width: cache columns [L, L + R)
    stride_kn, stride_kp, stride_kc,
    stride_btb, stride_btm,
    stride_sl,
    stride_cb, stride_cs, stride_cl,
    stride_pb, stride_ps, stride_pr,
    PAGE: tl.constexpr,  # P, the page size
    BLOCK_S: tl.constexpr,  # new tokens per program
    BLOCK_L: tl.constexpr,  # power of two >= L
    BLOCK_R: tl.constexpr,  # power of two >= R
):
    b = tl.program_id(0).to(tl.int64)
    toks = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    tok_ok = toks < S
    pos = tl.load(seqlens_ptr + b * stride_sl) + toks  # absolute cache positions of the new tokens
    page = tl.load(bt_ptr + b * stride_btb + (pos // PAGE) * stride_btm, mask=tok_ok, other=0).to(tl.int64)
    # A cache's element offset can pass 2^31 (pages * P * C), hence int64 page ids.
    row = kv_ptr + page * stride_kn + (pos % PAGE).to(tl.int64) * stride_kp  # [BLOCK_S] row starts
    toks64 = toks.to(tl.int64)

    cl = tl.arange(0, BLOCK_L)
    m = tok_ok[:, None] & (cl < L)[None, :]
    x = tl.load(ckv_ptr + b * stride_cb + toks64[:, None] * stride_cs + cl[None, :] * stride_cl, mask=m, other=0.0)
    tl.store(row[:, None] + cl[None, :] * stride_kc, x.to(kv_ptr.dtype.element_ty), mask=m)

    cr = tl.arange(0, BLOCK_R)
    m = tok_ok[:, None] & (cr < R)[None, :]
    x = tl.load(kpe_ptr + b * stride_pb + toks64[:, None] * stride_ps + cr[None, :] * stride_pr, mask=m, other=0.0)
    tl.store(row[:, None] + (L + cr)[None, :] * stride_kc, x.to(kv_ptr.dtype.element_ty), mask=m)


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, Sq, H, C] queries [q_nope . W_UK, q_pe], any strides
    kv_ptr,  # [N, P, C] cache pages, q's dtype, any strides
    bt_ptr,  # [B, M] int32 block table, any strides
    seqlens_ptr,  # [B] int32 cached tokens per request (the Sq new ones included), stride stride_sl
    o_ptr,  # SINGLE: out [B, Sq, H, V] in q's dtype, contiguous; else [B, Sq*H, num_splits, V] fp32, contiguous
    lse_ptr,  # SINGLE: lse [B, H, Sq] fp32, contiguous; else [B, Sq*H, num_splits] fp32, contiguous
    Sq,  # new query tokens per request
    H,  # heads
    V,  # value width: cache columns [0, V) are the values (and the first part of the keys)
    C,  # cache row width: columns [V, C) are the rest of the keys
    num_splits,  # programs along grid axis 1 that share one request's positions
    qk_scale,  # softmax_scale * log2(e): scores in base 2
    stride_qb, stride_qs, stride_qh, stride_qc,
    stride_kn, stride_kp, stride_kc,
    stride_btb, stride_btm,
    stride_sl,
    CAUSAL: tl.constexpr,  # query i sees positions < seqlen - Sq + i + 1 (else < seqlen)
    SINGLE: tl.constexpr,  # num_splits == 1: write the final out / lse here, no merge pass
    PAGE: tl.constexpr,  # P, the page size
    BLOCK_H: tl.constexpr,  # rows (query, head) per program; >= 16 for tl.dot
    BLOCK_N: tl.constexpr,  # cache positions per step (independent of P: a tile may span pages)
    BLOCK_V: tl.constexpr,  # power of two >= V
    BLOCK_R: tl.constexpr,  # power of two >= C - V (>= 16)
    HAS_REST: tl.constexpr,  # C > V: the key has columns past the values (k_pe in V3)
):
    rows = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    SqH = Sq * H
    row_ok = rows < SqH
    qi = rows // H  # query token of each row
    hh = rows % H  # head of each row

    seqlen = tl.load(seqlens_ptr + b * stride_sl)
    # Per row, how many leading cache positions it sees; rows of the padding see none.
    if CAUSAL:
        vis = seqlen - Sq + qi + 1
    else:
        vis = tl.zeros([BLOCK_H], dtype=tl.int32) + seqlen
    vis = tl.where(row_ok, vis, 0)
    # Positions this block of rows needs: no tile past the last visible position is loaded, so slots at or
    # after the request's length (possibly NaN) never reach a register.
    kv_len = tl.maximum(tl.max(vis, axis=0), 0)
    n_tiles = tl.cdiv(kv_len, BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    t_begin = split * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)

    # The queries stay in registers for the whole walk.
    q_row = q_ptr + b * stride_qb + qi.to(tl.int64) * stride_qs + hh.to(tl.int64) * stride_qh  # [BLOCK_H]
    cv = tl.arange(0, BLOCK_V)
    cv_ok = cv < V
    q_v = tl.load(q_row[:, None] + cv[None, :] * stride_qc, mask=row_ok[:, None] & cv_ok[None, :], other=0.0)
    if HAS_REST:
        cr = V + tl.arange(0, BLOCK_R)
        cr_ok = cr < C
        q_r = tl.load(q_row[:, None] + cr[None, :] * stride_qc, mask=row_ok[:, None] & cr_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max score (base 2)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_H, BLOCK_V], dtype=tl.float32)  # running sum of p * v
    offs_n = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + b * stride_btb
    for t in range(t_begin, t_end):
        pos = t * BLOCK_N + offs_n
        pos_ok = pos < kv_len
        page = tl.load(bt_row + (pos // PAGE) * stride_btm, mask=pos_ok, other=0).to(tl.int64)
        kv_row = kv_ptr + page * stride_kn + (pos % PAGE).to(tl.int64) * stride_kp  # [BLOCK_N]
        # One load of the value columns serves as K (for q.k) and as V (for p.v).
        kv = tl.load(kv_row[:, None] + cv[None, :] * stride_kc, mask=pos_ok[:, None] & cv_ok[None, :], other=0.0)
        s = tl.dot(q_v, tl.trans(kv), input_precision="ieee")  # [BLOCK_H, BLOCK_N] fp32
        if HAS_REST:
            kr = tl.load(kv_row[:, None] + cr[None, :] * stride_kc, mask=pos_ok[:, None] & cr_ok[None, :], other=0.0)
            s = tl.dot(q_r, tl.trans(kr), s, input_precision="ieee")
        s = tl.where(pos[None, :] < vis[:, None], s * qk_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen nothing yet has m_new = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision="ieee")
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows that saw nothing: acc is 0, so out is 0
    # (m_i + log2 l_i) is the lse in base 2; times ln 2 gives the natural log the API returns.
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    rows64 = rows.to(tl.int64)
    if SINGLE:
        o_offs = (b * SqH + rows64)[:, None] * V + cv[None, :]
        tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & cv_ok[None, :])
        tl.store(lse_ptr + (b * H + hh) * Sq + qi, lse, mask=row_ok)  # lse is [B, H, Sq]
    else:
        part = (b * SqH + rows64) * num_splits + split  # [BLOCK_H] index into [B, Sq*H, num_splits]
        tl.store(o_ptr + part[:, None] * V + cv[None, :], out, mask=row_ok[:, None] & cv_ok[None, :])
        tl.store(lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    o_part_ptr,  # [B, Sq*H, num_splits, V] fp32 normalised partial outputs, contiguous
    lse_part_ptr,  # [B, Sq*H, num_splits] fp32 partial lse (-inf for an empty split), contiguous
    out_ptr,  # [B, Sq, H, V] output in q's dtype, contiguous
    lse_ptr,  # [B, H, Sq] fp32 output, contiguous
    Sq,
    H,
    V,
    num_splits,
    BLOCK_H: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # value columns per program
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    SqH = Sq * H
    row_ok = rows < SqH
    mask = row_ok[:, None] & (cols < V)[None, :]
    part = (b * SqH + rows.to(tl.int64)) * num_splits  # [BLOCK_H] first split of each row

    # Online log-sum-exp over the splits (natural log; the partial lse are natural logs).
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_V], dtype=tl.float32)
    for sp in range(0, num_splits):
        l_s = tl.load(lse_part_ptr + part + sp, mask=row_ok, other=float("-inf"))
        o_s = tl.load(o_part_ptr + (part + sp)[:, None] * V + cols[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, l_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split seen anything yet: weights stay 0
        alpha = tl.exp(m - m_safe)
        w = tl.exp(l_s - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * o_s
        total = total * alpha + w
        m = m_new

    seen = total > 0.0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    qi = rows // H
    hh = rows % H
    tl.store(out_ptr + (b * SqH + rows.to(tl.int64))[:, None] * V + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)
    if tl.program_id(2) == 0:  # one column block writes the lse
        lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
        tl.store(lse_ptr + (b * H + hh) * Sq + qi, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------------------
# Launchers


def _pow2(n: int, floor: int = 16) -> int:
    """A power of two >= max(n, floor): tl.arange needs powers of two and tl.dot dims of at least 16."""
    return max(floor, triton.next_power_of_2(max(n, 1)))


def mla_cache_append(kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                     c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
    """Write ``[c_kv, k_pe]`` of S new tokens per request at positions ``cache_seqlens[b] + s`` (in place).

    kv_cache ``[N, P, C]``, block_table ``[B, M]`` int32, cache_seqlens ``[B]`` int32 (before the new
    tokens), c_kv ``[B, S, L]``, k_pe ``[B, S, C - L]``; any strides; values cast to the cache's dtype.
    Positions must lie inside the pages the block table owns (not checked: that would need a host sync).
    """
    if kv_cache.dim() != 3 or c_kv.dim() != 3 or k_pe.dim() != 3:
        raise ValueError("r1kernels.triton.mla_decode.mla_cache_append: kv_cache, c_kv and k_pe must be 3-d")
    b, s, lr = c_kv.shape
    r = kv_cache.shape[2] - lr
    if tuple(k_pe.shape) != (b, s, r):
        raise ValueError(f"r1kernels.triton.mla_decode.mla_cache_append: k_pe must be [{b}, {s}, {r}], "
                         f"got {tuple(k_pe.shape)}")
    if b == 0 or s == 0:
        return
    block_l, block_r = _pow2(lr, 1), _pow2(r, 1)
    # The kernel is a copy through registers: on a GPU about 4096 elements per program (8 tokens of a
    # 512-wide latent) keeps 4 warps from spilling; the interpreter prefers few programs.
    block_s = min(triton.next_power_of_2(s), max(1, 4096 // block_l) if kv_cache.is_cuda else 256)
    _cache_append_kernel[(b, triton.cdiv(s, block_s))](
        kv_cache, block_table, cache_seqlens, c_kv, k_pe,
        s, lr, r,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_table.stride(0), block_table.stride(1),
        cache_seqlens.stride(0),
        c_kv.stride(0), c_kv.stride(1), c_kv.stride(2),
        k_pe.stride(0), k_pe.stride(1), k_pe.stride(2),
        PAGE=kv_cache.shape[1], BLOCK_S=block_s, BLOCK_L=block_l, BLOCK_R=block_r,
        num_warps=4,
    )


def decode_blocks(batch: int, rows: int, width_v: int, width_rest: int, max_positions: int,
                  device: torch.device, elem_bytes: int = 2) -> dict:
    """Tile sizes, launch options and ``num_splits`` for a decode call; from shapes only (no host sync).

    rows = Sq * H; max_positions = M * P, the most positions any request can have; elem_bytes the size of
    one element of q and the cache.
    """
    wide = width_v + width_rest > 256
    if device.type == "cuda":
        # With 512-wide values the fp32 accumulator [BLOCK_H, 512] and the queries [BLOCK_H, 576] live in
        # registers: 16 rows per program keeps 4 warps from spilling (the choice of SGLang's grouped MLA
        # decode); narrower rows can take more of them.
        block_h = min(_pow2(rows), 16 if wide else 64)
        block_n = 32 if wide else 64
        # Two pipeline stages of a [32, 576] tile: 72 KiB in 16-bit types; fp32 tiles are twice that, so
        # fp32 (a correctness path, not a fast one) takes a single stage to stay inside shared memory.
        opts = dict(num_warps=4, num_stages=1 if wide and elem_bytes > 2 else 2)
        target = 2 * persistent_programs(device)  # two waves of programs over the SMs
        max_splits = 64
    else:
        # Under the interpreter a program costs Python work per op: few, large programs are fastest.
        block_h = min(_pow2(rows), 64)
        block_n = 64
        opts = {}
        target = persistent_programs(device)
        max_splits = 8
    head_blocks = triton.cdiv(rows, block_h)
    tiles = max(1, triton.cdiv(max_positions, block_n))
    num_splits = max(1, min(triton.cdiv(target, batch * head_blocks), tiles, max_splits))
    return dict(block_h=block_h, block_n=block_n, num_splits=num_splits, opts=opts)


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               softmax_scale: float, causal: bool, head_dim_v: int, *,
               num_splits: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed paged MLA decode (semantics: ``r1kernels.reference.mla_decode``).

    q ``[B, Sq, H, C]``, kv_cache ``[N, P, C]`` (q's dtype), block_table ``[B, M]`` int32, cache_seqlens
    ``[B]`` int32 (the Sq new tokens included); any strides. ``num_splits`` overrides the split count
    chosen from the shapes (tests use it to cover the merge).
    Returns out ``[B, Sq, H, head_dim_v]`` in q's dtype and lse ``[B, H, Sq]`` fp32 (natural log).
    """
    if q.dim() != 4 or kv_cache.dim() != 3 or kv_cache.shape[2] != q.shape[3]:
        raise ValueError(f"r1kernels.triton.mla_decode.mla_decode: q must be [B, Sq, H, C] and kv_cache [N, P, C]; "
                         f"got {tuple(q.shape)} and {tuple(kv_cache.shape)}")
    if q.dtype not in _FLOATS or kv_cache.dtype != q.dtype:
        raise TypeError(f"r1kernels.triton.mla_decode.mla_decode: q and kv_cache must share one float dtype; "
                        f"got {q.dtype} and {kv_cache.dtype}")
    bsz, sq, h, c = q.shape
    v = int(head_dim_v)
    if not 0 < v <= c:
        raise ValueError(f"r1kernels.triton.mla_decode.mla_decode: head_dim_v={v} must be in (0, C={c}]")
    out = torch.empty(bsz, sq, h, v, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, h, sq, dtype=torch.float32, device=q.device)
    if bsz * sq * h == 0:
        return out, lse
    if kv_cache.numel() == 0 or block_table.shape[1] == 0:
        # No cache row exists, so every request must be empty (as the reference requires): nothing is seen.
        return out.zero_(), lse.fill_(float("-inf"))

    rows = sq * h
    page = kv_cache.shape[1]
    cfg = decode_blocks(bsz, rows, v, c - v, block_table.shape[1] * page, q.device, q.element_size())
    splits = cfg["num_splits"] if num_splits is None else int(num_splits)
    if splits < 1:
        raise ValueError(f"r1kernels.triton.mla_decode.mla_decode: num_splits must be >= 1, got {splits}")
    single = splits == 1
    if single:
        o_buf, lse_buf = out, lse
    else:
        o_buf = torch.empty(bsz, rows, splits, v, dtype=torch.float32, device=q.device)
        lse_buf = torch.empty(bsz, rows, splits, dtype=torch.float32, device=q.device)
    block_h = cfg["block_h"]
    if bsz > 65535:  # the batch is grid axis 2, which CUDA caps at 65535
        raise ValueError(f"r1kernels.triton.mla_decode.mla_decode: at most 65535 requests per call, got {bsz}")
    _decode_split_kernel[(triton.cdiv(rows, block_h), splits, bsz)](
        q, kv_cache, block_table, cache_seqlens, o_buf, lse_buf,
        sq, h, v, c, splits, float(softmax_scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_table.stride(0), block_table.stride(1),
        cache_seqlens.stride(0),
        CAUSAL=bool(causal), SINGLE=single, PAGE=page,
        BLOCK_H=block_h, BLOCK_N=cfg["block_n"], BLOCK_V=_pow2(v), BLOCK_R=_pow2(c - v), HAS_REST=c > v,
        **cfg["opts"],
    )
    if not single:
        merge_v = min(_pow2(v), 128) if q.is_cuda else _pow2(v)
        merge_h = min(_pow2(rows), 16 if q.is_cuda else 64)
        _decode_merge_kernel[(bsz, triton.cdiv(rows, merge_h), triton.cdiv(v, merge_v))](
            o_buf, lse_buf, out, lse, sq, h, v, splits,
            BLOCK_H=merge_h, BLOCK_V=merge_v, **({"num_warps": 4} if q.is_cuda else {}),
        )
    return out, lse
