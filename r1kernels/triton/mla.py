"""Packed variable-length flash attention for MLA prefill and training, forward and backward, in Triton.

Letters:
    T packed tokens, B sequences, H heads, Dqk query/key head dim (192 in V3), Dv value head dim (128).
    Sequence b owns tokens ``cu_seqlens[b]:cu_seqlens[b+1]``; n its length, positions 0..n-1 inside it.
    BM query rows per tile, BN key rows per tile.
    DA, DB: Dqk = DA + DB with DA the largest power of two <= Dqk and DB the rest (0 when Dqk is a power
        of two: the B tiles are then compiled out); BDB = DB rounded up to a power of two (its columns past
        DB are masked). Dqk = 192 is 128 + 64, so the V3 shape computes no padded columns (one 256-wide tile
        would waste a quarter of the q.k flops).
    BDV: Dv rounded up to a power of two (columns past Dv masked).
    s = scale * q.k, p = softmax(s) per row, lse = logsumexp(s) per row (natural log, fp32, ``[H, T]``).

Forward (``_fwd_kernel``): one program per (query tile, sequence, head); online softmax over key tiles in
base 2 (log2(e) folded into the scale, so each score costs one exp2), fp32 accumulators, one rounding of the
output at the store. Causal programs stop at the diagonal. Key tiles that need no mask (inside the sequence
and, causal, wholly at or below the diagonal) run a loop without mask arithmetic; the few others (the
diagonal, the sequence's tail) run a masked copy of it.

Backward (FlashAttention-2): ``_bwd_preprocess_kernel`` gives delta = rowsum(dO * O) - dlse per row;
``_bwd_dkdv_kernel`` has one program per (key tile, sequence, head) and loops over the query tiles that see
it, accumulating dK and dV in registers; ``_bwd_dq_kernel`` has one program per (query tile, sequence, head)
and loops over key tiles for dQ. Every output element is written by exactly one program: no atomics, the
same bits on every run. p is recomputed from the saved lse (no [T, T] matrix is ever stored).

The gradient of lse is supported at no extra cost: d lse / d s = p, so it enters as ``ds = p * (dp - delta)``
with ``delta = rowsum(dO * O) - dlse``.

Grids depend on shapes and ``max_seqlen`` only (no host sync); programs whose tile starts past their
sequence's end return at once. A row that sees no key (only possible for a row of an empty sequence, which
has no row) would give 0 output and lse = -inf; the masked loop guards the running max so it never forms
``-inf - -inf``. fp32 dots use IEEE precision (no TF32).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # the widest Dqk / Dv the tiles are sized for (register budget of the dK/dV program)
_LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))


# --------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` (``acc`` may be None). IEEE: fp32 operands multiplied in full fp32 (no TF32 on the
    GPU, so fp32 results meet the fp32 tolerance); else ``a`` is cast to ``b``'s 16-bit dtype first, since
    tensor cores take two operands of one dtype (the softmax probabilities are kept in fp32 until here)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def _load_tile(
    base,  # pointer at (sequence start, head)
    rows,  # [R] int32 positions inside the sequence
    cols,  # [C] int32 columns
    stride_r, stride_c,
    n_rows,  # the sequence length: rows at or past it read 0 when ROW_MASK
    n_cols,  # the head dim: columns at or past it read 0 when COL_MASK
    ROW_MASK: tl.constexpr,  # the tile may reach past the sequence
    COL_MASK: tl.constexpr,  # the tile is wider than the head dim (padded to a power of two)
):
    """A [R, C] tile; masks only where the caller says the tile can overhang, so that interior tiles of
    power-of-two head dims load without any predicate."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_r + cols[None, :] * stride_c  # token offsets can pass 2^31
    if ROW_MASK:
        if COL_MASK:
            tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    else:
        if COL_MASK:
            tile = tl.load(ptrs, mask=(cols < n_cols)[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _fwd_inner(
    acc, m_i, l_i,  # [BM, BDV] fp32 unnormalised output, [BM] running max (base 2), [BM] running sum
    qa, qb,  # [BM, DA] and [BM, BDB] query tiles (qb unused when DB == 0)
    k_base, v_base,  # k / v pointers at (sequence start, head)
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m,  # [BM] query positions inside the sequence
    lo, hi,  # key tiles start at lo, lo + BN, ... < hi
    seqlen,  # n
    qk_scale,  # scale * log2(e)
    DA: tl.constexpr, DB: tl.constexpr, BDB: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    BN: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,  # apply the length and causal masks (tiles at the diagonal or the tail)
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dots
):
    offs_n0 = tl.arange(0, BN)
    cols_a = tl.arange(0, DA)
    cols_b = tl.arange(0, BDB)
    cols_v = tl.arange(0, BDV)
    for n0 in range(lo, hi, BN):
        offs_n = n0 + offs_n0
        ka = _load_tile(k_base, offs_n, cols_a, stride_kt, stride_kd, seqlen, DA, MASKED, False)
        s = _dot(qa, tl.trans(ka), None, IEEE)
        if DB > 0:
            kb = _load_tile(k_base + DA * stride_kd, offs_n, cols_b, stride_kt, stride_kd, seqlen, DB, MASKED, BDB != DB)
            s = _dot(qb, tl.trans(kb), s, IEEE)
        s = s * qk_scale  # [BM, BN] scores in base 2
        if MASKED:
            keep = (offs_n < seqlen)[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing visible yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_tile(v_base, offs_n, cols_v, stride_vt, stride_vd, seqlen, DV, MASKED, BDV != DV)
        acc = _dot(p, v, acc, IEEE)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    q_ptr,  # [T, H, Dqk] queries, any strides
    k_ptr,  # [T, H, Dqk] keys, any strides
    v_ptr,  # [T, H, Dv] values, any strides
    o_ptr,  # [T, H, Dv] output in q's dtype, strides (stride_ot, stride_oh, 1)
    lse_ptr,  # [H, T] fp32 output: natural-log logsumexp of each row's scores, row stride stride_lh
    cu_ptr,  # [B + 1] int32 sequence boundaries
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh,
    stride_lh,
    qk_scale,  # softmax scale * log2(e)
    DA: tl.constexpr,  # the power-of-two leading part of Dqk
    DB: tl.constexpr,  # the rest of Dqk (0 if none)
    BDB: tl.constexpr,  # DB rounded up to a power of two (16, unused, when DB == 0)
    DV: tl.constexpr,  # Dv
    BDV: tl.constexpr,  # Dv rounded up to a power of two
    BM: tl.constexpr,  # query rows per program
    BN: tl.constexpr,  # key rows per loop step
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dots
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_ptr + seq)
    seqlen = tl.load(cu_ptr + seq + 1) - start
    m0 = pid_m * BM
    if m0 >= seqlen:  # the grid is sized by the longest sequence; shorter ones leave programs idle
        return

    start64 = start.to(tl.int64)
    q_base = q_ptr + start64 * stride_qt + head * stride_qh
    k_base = k_ptr + start64 * stride_kt + head * stride_kh
    v_base = v_ptr + start64 * stride_vt + head * stride_vh

    offs_m = m0 + tl.arange(0, BM)
    m_ok = offs_m < seqlen
    rows_m = offs_m.to(tl.int64)
    qa = _load_tile(q_base, offs_m, tl.arange(0, DA), stride_qt, stride_qd, seqlen, DA, True, False)
    if DB > 0:
        qb = _load_tile(q_base + DA * stride_qd, offs_m, tl.arange(0, BDB), stride_qt, stride_qd, seqlen, DB, True,
                        BDB != DB)
    else:
        qb = qa  # not read: the kernels only touch qb when DB > 0

    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, BDV), dtype=tl.float32)

    # Key tiles [n0, n0 + BN) with n0 + BN <= n need no length mask; causal ones also need n0 + BN - 1 <= m0
    # (every row of this tile sees every key of that one). Causal rows never see keys at or past m0 + BM.
    full_hi = (seqlen // BN) * BN
    hi = seqlen
    if CAUSAL:
        full_hi = tl.minimum(full_hi, ((m0 + 1) // BN) * BN)
        hi = tl.minimum(seqlen, m0 + BM)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, qa, qb, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, 0, full_hi, seqlen, qk_scale, DA, DB, BDB, DV, BDV, BN, CAUSAL, False, IEEE)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, qa, qb, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, full_hi, hi, seqlen, qk_scale, DA, DB, BDB, DV, BDV, BN, CAUSAL, True, IEEE)

    seen = l_i > 0.0  # false only for a row that saw no key: output 0 and lse -inf, never 0/0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    cols_v = tl.arange(0, BDV)
    o_base = o_ptr + start64 * stride_ot + head * stride_oh
    tl.store(o_base + rows_m[:, None] * stride_ot + cols_v[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (cols_v[None, :] < DV))
    tl.store(lse_ptr + head.to(tl.int64) * stride_lh + start64 + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_preprocess_kernel(
    o_ptr,  # [T, H, Dv] forward output, strides (stride_ot, stride_oh, 1)
    do_ptr,  # [T, H, Dv] gradient of the output, any strides
    dlse_ptr,  # [H, T] fp32 gradient of lse, row stride stride_lh (read when HAS_DLSE)
    delta_ptr,  # [H, T] fp32 output: rowsum(dO * O) - dlse, row stride stride_lh
    T,
    stride_ot, stride_oh,
    stride_dot, stride_doh, stride_dod,
    stride_lh,
    DV: tl.constexpr,
    BDV: tl.constexpr,
    BT: tl.constexpr,  # tokens per program
    HAS_DLSE: tl.constexpr,
):
    head = tl.program_id(1)
    toks = tl.program_id(0) * BT + tl.arange(0, BT)
    t_ok = toks < T
    toks64 = toks.to(tl.int64)
    cols = tl.arange(0, BDV)
    mask = t_ok[:, None] & (cols[None, :] < DV)
    o = tl.load(o_ptr + toks64[:, None] * stride_ot + head * stride_oh + cols[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + toks64[:, None] * stride_dot + head * stride_doh + cols[None, :] * stride_dod,
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = head.to(tl.int64) * stride_lh + toks64
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + row, mask=t_ok, other=0.0)
    tl.store(delta_ptr + row, delta, mask=t_ok)


@triton.jit
def _bwd_dkdv_inner(
    dka, dkb, dv,  # [BN, DA], [BN, BDB], [BN, BDV] fp32 accumulators (dkb unused when DB == 0)
    ka, kb, v,  # this program's key / value tiles
    q_base, do_base, lse_base, delta_base,  # pointers at (sequence start, head)
    stride_qt, stride_qd, stride_dot, stride_dod,
    offs_n,  # [BN] key positions inside the sequence
    lo, hi,  # query tiles start at lo, lo + BM, ... < hi
    seqlen,
    qk_scale,  # scale * log2(e)
    DA: tl.constexpr, DB: tl.constexpr, BDB: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE: tl.constexpr,
):
    offs_m0 = tl.arange(0, BM)
    cols_a = tl.arange(0, DA)
    cols_b = tl.arange(0, BDB)
    cols_v = tl.arange(0, BDV)
    for m0 in range(lo, hi, BM):
        offs_m = m0 + offs_m0
        # Query rows past the sequence read q = dO = 0 and lse = delta = 0: their terms are exactly 0, so only
        # the causal mask (below) is needed, never a row mask on p.
        qa = _load_tile(q_base, offs_m, cols_a, stride_qt, stride_qd, seqlen, DA, MASKED, False)
        st = _dot(ka, tl.trans(qa), None, IEEE)  # [BN, BM]: s transposed
        if DB > 0:
            qb = _load_tile(q_base + DA * stride_qd, offs_m, cols_b, stride_qt, stride_qd, seqlen, DB, MASKED, BDB != DB)
            st = _dot(kb, tl.trans(qb), st, IEEE)
        if MASKED:
            m_ok = offs_m < seqlen
            lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        pt = tl.math.exp2(st * qk_scale - (lse * 1.4426950408889634)[None, :])  # [BN, BM] p transposed
        if MASKED:
            if CAUSAL:
                pt = tl.where(offs_m[None, :] >= offs_n[:, None], pt, 0.0)
        do = _load_tile(do_base, offs_m, cols_v, stride_dot, stride_dod, seqlen, DV, MASKED, BDV != DV)
        dv = _dot(pt, do, dv, IEEE)
        dpt = _dot(v, tl.trans(do), None, IEEE)  # [BN, BM]: (dO v^T) transposed
        dst = pt * (dpt - delta[None, :])  # d(scores) transposed, without the scale (applied once at the end)
        dka = _dot(dst, qa, dka, IEEE)
        if DB > 0:
            dkb = _dot(dst, qb, dkb, IEEE)
    return dka, dkb, dv


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr,  # forward inputs, any strides ([T, H, Dqk], [T, H, Dqk], [T, H, Dv])
    do_ptr,  # [T, H, Dv] gradient of the output, any strides
    lse_ptr,  # [H, T] fp32 forward lse (natural log), row stride stride_lh
    delta_ptr,  # [H, T] fp32 from the preprocess kernel, row stride stride_lh
    dk_ptr,  # [T, H, Dqk] output in k's dtype, strides (stride_dkt, stride_dkh, 1)
    dv_ptr,  # [T, H, Dv] output in v's dtype, strides (stride_dvt, stride_dvh, 1)
    cu_ptr,  # [B + 1] int32
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_lh,
    stride_dkt, stride_dkh,
    stride_dvt, stride_dvh,
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale (dK = scale * dS^T Q)
    DA: tl.constexpr, DB: tl.constexpr, BDB: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr,  # query rows per loop step
    BN: tl.constexpr,  # key rows per program
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_ptr + seq)
    seqlen = tl.load(cu_ptr + seq + 1) - start
    n0 = pid_n * BN
    if n0 >= seqlen:
        return

    start64 = start.to(tl.int64)
    offs_n = n0 + tl.arange(0, BN)
    n_ok = offs_n < seqlen
    rows_n = offs_n.to(tl.int64)
    cols_a = tl.arange(0, DA)
    cols_v = tl.arange(0, BDV)
    k_base = k_ptr + start64 * stride_kt + head * stride_kh
    v_base = v_ptr + start64 * stride_vt + head * stride_vh
    # Key rows past the sequence read 0; their dK / dV rows are computed but never stored.
    ka = _load_tile(k_base, offs_n, cols_a, stride_kt, stride_kd, seqlen, DA, True, False)
    v = _load_tile(v_base, offs_n, cols_v, stride_vt, stride_vd, seqlen, DV, True, BDV != DV)
    if DB > 0:
        cols_b = tl.arange(0, BDB)
        kb = _load_tile(k_base + DA * stride_kd, offs_n, cols_b, stride_kt, stride_kd, seqlen, DB, True, BDB != DB)
        dkb = tl.zeros((BN, BDB), dtype=tl.float32)
    else:
        kb = ka  # not read when DB == 0
        dkb = tl.zeros((BN, DA), dtype=tl.float32)  # not read when DB == 0
    dka = tl.zeros((BN, DA), dtype=tl.float32)
    dv = tl.zeros((BN, BDV), dtype=tl.float32)

    q_base = q_ptr + start64 * stride_qt + head * stride_qh
    do_base = do_ptr + start64 * stride_dot + head * stride_doh
    lse_base = lse_ptr + head.to(tl.int64) * stride_lh + start64
    delta_base = delta_ptr + head.to(tl.int64) * stride_lh + start64

    # Query tiles [m0, m0 + BM) that see this key tile: causal, those with m0 + BM > n0, i.e. from lo.
    # A tile needs no mask when it lies inside the sequence (m0 + BM <= n) and, causal, every row of it sees
    # every key here (m0 >= n0 + BN - 1). Masked tiles before the unmasked run (the diagonal) and after it
    # (the sequence's tail).
    lo = 0
    full_lo = 0
    if CAUSAL:
        lo = (n0 // BM) * BM
        full_lo = ((n0 + BN - 1 + BM - 1) // BM) * BM
    full_hi = tl.maximum((seqlen // BM) * BM, full_lo)
    dka, dkb, dv = _bwd_dkdv_inner(dka, dkb, dv, ka, kb, v, q_base, do_base, lse_base, delta_base,
                                   stride_qt, stride_qd, stride_dot, stride_dod, offs_n,
                                   lo, tl.minimum(full_lo, seqlen), seqlen, qk_scale,
                                   DA, DB, BDB, DV, BDV, BM, CAUSAL, True, IEEE)
    dka, dkb, dv = _bwd_dkdv_inner(dka, dkb, dv, ka, kb, v, q_base, do_base, lse_base, delta_base,
                                   stride_qt, stride_qd, stride_dot, stride_dod, offs_n,
                                   full_lo, full_hi, seqlen, qk_scale,
                                   DA, DB, BDB, DV, BDV, BM, CAUSAL, False, IEEE)
    dka, dkb, dv = _bwd_dkdv_inner(dka, dkb, dv, ka, kb, v, q_base, do_base, lse_base, delta_base,
                                   stride_qt, stride_qd, stride_dot, stride_dod, offs_n,
                                   full_hi, seqlen, seqlen, qk_scale,
                                   DA, DB, BDB, DV, BDV, BM, CAUSAL, True, IEEE)

    dk_base = dk_ptr + start64 * stride_dkt + head * stride_dkh
    tl.store(dk_base + rows_n[:, None] * stride_dkt + cols_a[None, :], (dka * sm_scale).to(dk_ptr.dtype.element_ty),
             mask=n_ok[:, None])
    if DB > 0:
        tl.store(dk_base + rows_n[:, None] * stride_dkt + (DA + cols_b)[None, :],
                 (dkb * sm_scale).to(dk_ptr.dtype.element_ty), mask=n_ok[:, None] & (cols_b[None, :] < DB))
    dv_base = dv_ptr + start64 * stride_dvt + head * stride_dvh
    tl.store(dv_base + rows_n[:, None] * stride_dvt + cols_v[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (cols_v[None, :] < DV))


@triton.jit
def _bwd_dq_inner(
    dqa, dqb,  # [BM, DA], [BM, BDB] fp32 accumulators (dqb unused when DB == 0)
    qa, qb, do,  # this program's query tiles and output-gradient tile [BM, BDV]
    lse, delta,  # [BM] fp32: lse in base 2, delta
    k_base, v_base,
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m,
    lo, hi,  # key tiles start at lo, lo + BN, ... < hi
    seqlen,
    qk_scale,
    DA: tl.constexpr, DB: tl.constexpr, BDB: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    BN: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE: tl.constexpr,
):
    offs_n0 = tl.arange(0, BN)
    cols_a = tl.arange(0, DA)
    cols_b = tl.arange(0, BDB)
    cols_v = tl.arange(0, BDV)
    for n0 in range(lo, hi, BN):
        offs_n = n0 + offs_n0
        ka = _load_tile(k_base, offs_n, cols_a, stride_kt, stride_kd, seqlen, DA, MASKED, False)
        s = _dot(qa, tl.trans(ka), None, IEEE)
        if DB > 0:
            kb = _load_tile(k_base + DA * stride_kd, offs_n, cols_b, stride_kt, stride_kd, seqlen, DB, MASKED, BDB != DB)
            s = _dot(qb, tl.trans(kb), s, IEEE)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            # keys past the sequence read k = 0, whose score is not -inf: drop them explicitly
            keep = (offs_n < seqlen)[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        v = _load_tile(v_base, offs_n, cols_v, stride_vt, stride_vd, seqlen, DV, MASKED, BDV != DV)
        dp = _dot(do, tl.trans(v), None, IEEE)
        ds = p * (dp - delta[:, None])  # without the scale (applied once at the end)
        dqa = _dot(ds, ka, dqa, IEEE)
        if DB > 0:
            dqb = _dot(ds, kb, dqb, IEEE)
    return dqa, dqb


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr,  # forward inputs, any strides
    do_ptr,  # [T, H, Dv] gradient of the output, any strides
    lse_ptr,  # [H, T] fp32 forward lse (natural log), row stride stride_lh
    delta_ptr,  # [H, T] fp32 from the preprocess kernel, row stride stride_lh
    dq_ptr,  # [T, H, Dqk] output in q's dtype, strides (stride_dqt, stride_dqh, 1)
    cu_ptr,  # [B + 1] int32
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_lh,
    stride_dqt, stride_dqh,
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale (dQ = scale * dS K)
    DA: tl.constexpr, DB: tl.constexpr, BDB: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr,  # query rows per program
    BN: tl.constexpr,  # key rows per loop step
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_ptr + seq)
    seqlen = tl.load(cu_ptr + seq + 1) - start
    m0 = pid_m * BM
    if m0 >= seqlen:
        return

    start64 = start.to(tl.int64)
    offs_m = m0 + tl.arange(0, BM)
    m_ok = offs_m < seqlen
    rows_m = offs_m.to(tl.int64)
    cols_a = tl.arange(0, DA)
    cols_v = tl.arange(0, BDV)
    q_base = q_ptr + start64 * stride_qt + head * stride_qh
    qa = _load_tile(q_base, offs_m, cols_a, stride_qt, stride_qd, seqlen, DA, True, False)
    if DB > 0:
        cols_b = tl.arange(0, BDB)
        qb = _load_tile(q_base + DA * stride_qd, offs_m, cols_b, stride_qt, stride_qd, seqlen, DB, True, BDB != DB)
        dqb = tl.zeros((BM, BDB), dtype=tl.float32)
    else:
        qb = qa  # not read when DB == 0
        dqb = tl.zeros((BM, DA), dtype=tl.float32)  # not read when DB == 0
    dqa = tl.zeros((BM, DA), dtype=tl.float32)
    do = _load_tile(do_ptr + start64 * stride_dot + head * stride_doh, offs_m, cols_v, stride_dot, stride_dod, seqlen, DV,
                    True, BDV != DV)
    row = head.to(tl.int64) * stride_lh + start64 + offs_m
    # Rows past the sequence: q = dO = 0, lse = delta = 0; their dQ rows are not stored.
    lse = tl.load(lse_ptr + row, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + row, mask=m_ok, other=0.0)

    k_base = k_ptr + start64 * stride_kt + head * stride_kh
    v_base = v_ptr + start64 * stride_vt + head * stride_vh
    full_hi = (seqlen // BN) * BN
    hi = seqlen
    if CAUSAL:
        full_hi = tl.minimum(full_hi, ((m0 + 1) // BN) * BN)
        hi = tl.minimum(seqlen, m0 + BM)
    dqa, dqb = _bwd_dq_inner(dqa, dqb, qa, qb, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt,
                             stride_vd, offs_m, 0, full_hi, seqlen, qk_scale, DA, DB, BDB, DV, BDV, BN, CAUSAL,
                             False, IEEE)
    dqa, dqb = _bwd_dq_inner(dqa, dqb, qa, qb, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt,
                             stride_vd, offs_m, full_hi, hi, seqlen, qk_scale, DA, DB, BDB, DV, BDV, BN, CAUSAL,
                             True, IEEE)

    dq_base = dq_ptr + start64 * stride_dqt + head * stride_dqh
    tl.store(dq_base + rows_m[:, None] * stride_dqt + cols_a[None, :], (dqa * sm_scale).to(dq_ptr.dtype.element_ty),
             mask=m_ok[:, None])
    if DB > 0:
        tl.store(dq_base + rows_m[:, None] * stride_dqt + (DA + cols_b)[None, :],
                 (dqb * sm_scale).to(dq_ptr.dtype.element_ty), mask=m_ok[:, None] & (cols_b[None, :] < DB))


# --------------------------------------------------------------------------------------------------------
# Launchers


def _split_dqk(dqk: int) -> tuple[int, int, int]:
    """(DA, DB, BDB): DA the largest power of two <= Dqk, DB = Dqk - DA, BDB its power-of-two tile."""
    da = 1 << (dqk.bit_length() - 1)
    db = dqk - da
    # with DB = 0 the B tile is never touched; 16 keeps its (unused) aranges well-formed
    return da, db, (triton.next_power_of_2(db) if db else 16)


def head_dims_reason(dqk: int, dv: int) -> Optional[str]:
    """Why these kernels cannot take head dims (Dqk, Dv) (None if they can)."""
    for name, d in (("Dqk", dqk), ("Dv", dv)):
        if d % 16 or not 16 <= d <= MAX_HEAD_DIM:
            return f"{name} = {d} must be a multiple of 16 in [16, {MAX_HEAD_DIM}] (the dot tiles' granularity)"
    return None


def _check_args(fn: str, q, k, v, cu_seqlens, max_seqlen) -> None:
    where = f"r1kernels.triton.mla.{fn}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{where}: {name} must be a 3-dim tensor [T, H, D], got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{where}: {name} must be float32 / float16 / bfloat16, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{where}: {name} is on {t.device}, q on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{where}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    t, h, dqk = q.shape
    if k.shape != q.shape or v.shape[:2] != (t, h):
        raise ValueError(f"{where}: k must be [T, H, Dqk] = {tuple(q.shape)} and v [T={t}, H={h}, Dv]; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    why = head_dims_reason(dqk, v.shape[2])
    if why is not None:
        raise ValueError(f"{where}: {why}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{where}: cu_seqlens must be int32 [B + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{where}: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    if max_seqlen < 0:
        raise ValueError(f"{where}: max_seqlen must be >= 0, got {max_seqlen}")


def _config(device: torch.device, dtype: torch.dtype, dqk: int, max_seqlen: int, bwd: bool) -> dict:
    """Tile sizes and launch options.

    GPU, 16-bit inputs: the forward keeps a [BM, Dqk] query tile and a [BM, Dv] fp32 accumulator in
    registers, 128 x 64 tiles with 8 warps as in FlashAttention-2's Triton kernels; the backward programs hold
    two or three fp32 accumulators of a tile's full width, so 64 x 64 (32-row steps when Dqk > 128, where
    dK + dV alone are 64 x 320 fp32). fp32 inputs take twice the bytes per element: halved tiles.
    Interpreter: every program and loop step costs a Python-level pass over numpy arrays, so the tiles are
    as large as the sequences allow (at least 16, tl.dot's minimum).
    """
    if device.type != "cuda":
        bm = max(16, min(64, triton.next_power_of_2(max(max_seqlen, 1))))
        return dict(BM=bm, BN=bm, opts={})
    wide = dqk > 128
    if dtype == torch.float32:
        return dict(BM=32, BN=32, opts=dict(num_warps=4, num_stages=2))
    if not bwd:
        return dict(BM=128, BN=64 if not wide else 32, opts=dict(num_warps=8, num_stages=2))
    return dict(BM=32 if wide else 64, BN=64, opts=dict(num_warps=8 if wide else 4, num_stages=2))


def mla_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [T, H, Dv] in q's dtype, lse [H, T] fp32 natural log)``; semantics of ``reference.mla_attention``.

    ``max_seqlen`` must be at least the longest sequence and ``cu_seqlens[-1] == T`` (not checked: that would
    read device memory on the host); rows outside every sequence are left unwritten.
    """
    _check_args("mla_attention_fwd", q, k, v, cu_seqlens, max_seqlen)
    t, h, dqk = q.shape
    dv = v.shape[2]
    out = torch.empty((t, h, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((h, t), dtype=torch.float32, device=q.device)
    b = cu_seqlens.numel() - 1
    if t == 0 or b == 0 or max_seqlen == 0 or h == 0:
        return out, lse
    cfg = _config(q.device, q.dtype, dqk, max_seqlen, bwd=False)
    da, db, bdb = _split_dqk(dqk)
    grid = (triton.cdiv(max_seqlen, cfg["BM"]), b, h)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1),
        lse.stride(0),
        float(scale) * _LOG2E,
        DA=da, DB=db, BDB=bdb, DV=dv, BDV=triton.next_power_of_2(dv), BM=cfg["BM"], BN=cfg["BN"],
        CAUSAL=bool(causal), IEEE=q.dtype == torch.float32, **cfg["opts"],
    )
    return out, lse


def mla_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
    dlse: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in the inputs' dtype from the forward's ``out`` and ``lse``.

    ``dout`` ``[T, H, Dv]`` any strides; ``dlse`` ``[H, T]`` (optional) the gradient of the returned lse.
    Deterministic: no atomics, every element is written by one program.
    """
    _check_args("mla_attention_bwd", q, k, v, cu_seqlens, max_seqlen)
    t, h, dqk = q.shape
    dvd = v.shape[2]
    where = "r1kernels.triton.mla.mla_attention_bwd"
    if out.shape != (t, h, dvd) or out.dtype != q.dtype or out.device != q.device or out.stride(2) != 1:
        raise ValueError(f"{where}: out must be the forward's output [{t}, {h}, {dvd}] {q.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    if dout.shape != out.shape or dout.device != q.device:
        raise ValueError(f"{where}: dout must be [{t}, {h}, {dvd}] on {q.device}, got {tuple(dout.shape)} on {dout.device}")
    if lse.shape != (h, t) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"{where}: lse must be the forward's fp32 [{h}, {t}], got {lse.dtype} {tuple(lse.shape)}")
    dq = torch.empty((t, h, dqk), dtype=q.dtype, device=q.device)
    dk = torch.empty((t, h, dqk), dtype=k.dtype, device=q.device)
    dv = torch.empty((t, h, dvd), dtype=v.dtype, device=q.device)
    b = cu_seqlens.numel() - 1
    if t == 0 or b == 0 or max_seqlen == 0 or h == 0:
        return dq, dk, dv
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    if dlse is not None:
        if dlse.shape != (h, t):
            raise ValueError(f"{where}: dlse must be [{h}, {t}], got {tuple(dlse.shape)}")
        dlse = dlse.to(torch.float32).contiguous()

    bdv = triton.next_power_of_2(dvd)
    delta = torch.empty((h, t), dtype=torch.float32, device=q.device)
    bt = 64 if q.device.type == "cuda" else max(16, min(1024, triton.next_power_of_2(t)))
    _bwd_preprocess_kernel[(triton.cdiv(t, bt), h)](
        out, dout, dlse if dlse is not None else delta, delta, t,
        out.stride(0), out.stride(1),
        dout.stride(0), dout.stride(1), dout.stride(2),
        delta.stride(0),
        DV=dvd, BDV=bdv, BT=bt, HAS_DLSE=dlse is not None,
    )

    cfg = _config(q.device, q.dtype, dqk, max_seqlen, bwd=True)
    da, db, bdb = _split_dqk(dqk)
    common = dict(DA=da, DB=db, BDB=bdb, DV=dvd, BDV=bdv, BM=cfg["BM"], BN=cfg["BN"], CAUSAL=bool(causal),
                  IEEE=q.dtype == torch.float32, **cfg["opts"])
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2), lse.stride(0))
    _bwd_dkdv_kernel[(triton.cdiv(max_seqlen, cfg["BN"]), b, h)](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, *strides,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        float(scale) * _LOG2E, float(scale), **common,
    )
    _bwd_dq_kernel[(triton.cdiv(max_seqlen, cfg["BM"]), b, h)](
        q, k, v, dout, lse, delta, dq, cu_seqlens, *strides,
        dq.stride(0), dq.stride(1),
        float(scale) * _LOG2E, float(scale), **common,
    )
    return dq, dk, dv
