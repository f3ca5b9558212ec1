"""Native Sparse Attention (NSA) in Triton: the compressed and sliding-window branches (one banded
flash-attention kernel set), block scores, top-n block selection, the selected-block branch, the gated sum,
and the decode step built from the same kernels. Semantics: ``r1kernels.reference.sparse``.

Letters (the reference's, plus the tiles'):
    T packed tokens, B sequences, H query heads, Hk KV heads, G = H / Hk, D / Dv head dims.
    l compression block, d compression stride, l' selection block, n selected blocks, w window, NB blocks per
    score row, Nc compressed tokens of a sequence.
    GP  G rounded up to a power of two. The G query heads of a KV group are stacked as the rows of one tile,
        so every K/V tile a program loads serves the whole group: row r of a query tile is query
        (r // GP) of the tile and head (r % GP) of the group; rows with r % GP >= G are padding (masked).
    BT  queries per tile, M = BT·GP rows; BN keys per step; BD / BDV = D / Dv rounded up to powers of two.
    MS  rows of a selected-attention tile: one query's GP heads padded to 16 (tl.dot's minimum); this is what
        lets G be anything from 1 to 16 (G < 16 wastes the padding rows, nothing else).
    BS  l' rounded up to a power of two (>= 16): one selection block per step.
    BC  compressed tokens per step of the score kernel, 16·l'/d, so that a step starts on a selection-block
        boundary and covers NJ = 16 blocks.

Banded attention (compressed and window branches, and dense causal as a special case): key i of a sequence
is visible to the query at position t iff lo(t) <= i < hi(t) with
    hi(t) = min(floor((t − OFF) / STRIDE) + 1, number of keys)   (0 when t < OFF),
    lo(t) = max(hi_unclipped(t) − WINDOW, 0)                      (0 without a window).
Compressed: OFF = l − 1, STRIDE = d (i·d + l − 1 <= t). Window: OFF = 0, STRIDE = 1, WINDOW = w. Both bounds
grow with t, so a tile of queries reads one contiguous key range, and a tile of keys is read by one
contiguous query range. Queries are described per sequence by start / end rows and the position of the
first row (decode: one query per sequence, at position seqlen − 1), keys by start / end rows, so prefill
(packed by cu_seqlens) and decode (a [B, Smax] cache) share the kernels.

Every kernel accumulates in fp32, rounds once at the store, and uses exp2 with log2(e) folded into the scale.
fp32 inputs use IEEE dots (no TF32). Backward passes are FlashAttention-2 style (delta = rowsum(dO·O) −
dlse, p recomputed from the saved lse) and deterministic: no atomics anywhere. The selected branch's dK / dV
are gathered per key block through an inverse (CSR) list of the queries that selected the block, cut into
chunks of at most ``chunk`` queries whose fp32 partial sums are then added in order.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .mla import _bwd_preprocess_kernel, head_dims_reason

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------------
# Shared pieces. Offsets are formed once per program (int64 where they scale with tokens) and pointers are
# advanced between loop steps, which keeps the integer work per step small on the GPU and the interpreter's
# per-operation cost low on the CPU.


@triton.jit
def _band(pos, n_keys, OFF, STRIDE, WINDOW, HAS_WINDOW: tl.constexpr):
    """(lo, hi): the keys [lo, hi) visible to position(s) ``pos`` (see the module docstring)."""
    hi_raw = tl.where(pos >= OFF, (pos - OFF) // STRIDE + 1, 0)
    hi = tl.minimum(hi_raw, n_keys)
    if HAS_WINDOW:
        lo = tl.maximum(hi_raw - WINDOW, 0)
    else:
        lo = hi_raw * 0
    return lo, hi


@triton.jit
def _group_rows(hk, G, GP: tl.constexpr, BT: tl.constexpr):
    """Rows of a query tile: (query index inside the tile [M], head [M], head row valid [M])."""
    r = tl.arange(0, BT * GP)
    g = r % GP
    return r // GP, hk * G + g, g < G


# --------------------------------------------------------------------------------------------------------
# Banded attention: compressed and sliding-window branches


@triton.jit
def _band_fwd_kernel(
    q_ptr,  # [*, H, D] queries, rows q_start[b] .. q_end[b] for sequence b, any strides
    k_ptr,  # [*, Hk, D] keys, rows k_start[b] .. k_end[b], any strides
    v_ptr,  # [*, Hk, Dv] values, same rows as k, any strides
    o_ptr,  # [*, H, Dv] output in q's dtype (last dim contiguous), same rows as q
    lse_ptr,  # [H, *] fp32 output: natural-log logsumexp of each row's scores (-inf: nothing visible)
    q_start_ptr, q_end_ptr,  # [B] int32
    k_start_ptr, k_end_ptr,  # [B] int32
    pos0_ptr,  # [B] int32 position of each sequence's first query row (read when HAS_POS0, else 0)
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh,
    stride_lh,
    G,  # query heads per KV head
    OFF, STRIDE, WINDOW,  # the visible band (module docstring)
    qk_scale,  # softmax scale * log2(e)
    D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    GP: tl.constexpr,  # G rounded up to a power of two
    BT: tl.constexpr,  # queries per program (M = BT * GP rows)
    BN: tl.constexpr,  # keys per loop step
    HAS_WINDOW: tl.constexpr,
    HAS_POS0: tl.constexpr,
    PREC: tl.constexpr,  # tl.dot input precision: "ieee" for fp32 inputs (no TF32), None for 16-bit ones
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    hk = tl.program_id(2)
    q0 = tl.load(q_start_ptr + seq)
    qlen = tl.load(q_end_ptr + seq) - q0
    m0 = pid_m * BT
    if m0 >= qlen:  # the grid is sized by the longest sequence
        return
    k0 = tl.load(k_start_ptr + seq)
    klen = tl.load(k_end_ptr + seq) - k0
    pos0 = 0
    if HAS_POS0:
        pos0 = tl.load(pos0_ptr + seq)

    rq, head, g_ok = _group_rows(hk, G, GP, BT)
    qi = m0 + rq
    row_ok = (qi < qlen) & g_ok
    lo, hi = _band(qi + pos0, klen, OFF, STRIDE, WINDOW, HAS_WINDOW)
    # keys seen by any row of the tile: from the first query's lo to the last query's hi
    lo_first, _ = _band(m0 + pos0, klen, OFF, STRIDE, WINDOW, HAS_WINDOW)
    _, hi_last = _band(tl.minimum(m0 + BT, qlen) - 1 + pos0, klen, OFF, STRIDE, WINDOW, HAS_WINDOW)

    cols = tl.arange(0, BD)
    col_ok = cols < D
    cols_v = tl.arange(0, BDV)
    colv_ok = cols_v < DV
    q_rows = (q0 + qi).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + (cols * stride_qd)[None, :], mask=row_ok[:, None] & col_ok[None, :],
                other=0.0)
    m_i = tl.full((BT * GP,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BT * GP,), dtype=tl.float32)
    acc = tl.zeros((BT * GP, BDV), dtype=tl.float32)

    n_start = (lo_first // BN) * BN
    offs_n = n_start + tl.arange(0, BN)
    k_base = k_ptr + k0.to(tl.int64) * stride_kt + hk * stride_kh
    v_base = v_ptr + k0.to(tl.int64) * stride_vt + hk * stride_vh
    for _n0 in range(n_start, hi_last, BN):
        n_ok = offs_n < klen
        rows = offs_n.to(tl.int64)  # 2-D pointers are rebuilt from these each step (carrying them costs registers)
        k = tl.load(k_base + rows[:, None] * stride_kt + (cols * stride_kd)[None, :],
                    mask=n_ok[:, None] & col_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [M, BN] in base 2
        keep = offs_n[None, :] < hi[:, None]
        if HAS_WINDOW:
            keep = keep & (offs_n[None, :] >= lo[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no -inf - -inf
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows[:, None] * stride_vt + (cols_v * stride_vd)[None, :],
                    mask=n_ok[:, None] & colv_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
        offs_n += BN

    seen = l_i > 0.0  # false for a row that sees no key: output 0 and lse -inf
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    o_rows = (q0 + qi).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(o_ptr + o_rows[:, None] + cols_v[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & colv_ok[None, :])
    tl.store(lse_ptr + head.to(tl.int64) * stride_lh + q0 + qi, lse, mask=row_ok)


@triton.jit
def _band_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr,  # forward inputs (rows as in _band_fwd_kernel)
    do_ptr,  # [*, H, Dv] gradient of the output, any strides
    lse_ptr,  # [H, *] fp32 forward lse, row stride stride_lh
    delta_ptr,  # [H, *] fp32 rowsum(dO * O) - dlse, row stride stride_lh
    dq_ptr,  # [*, H, D] output in q's dtype, last dim contiguous
    q_start_ptr, q_end_ptr, k_start_ptr, k_end_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dqt, stride_dqh,
    stride_lh,
    G, OFF, STRIDE, WINDOW,
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale (dQ = scale * dS K)
    D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    GP: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    hk = tl.program_id(2)
    q0 = tl.load(q_start_ptr + seq)
    qlen = tl.load(q_end_ptr + seq) - q0
    m0 = pid_m * BT
    if m0 >= qlen:
        return
    k0 = tl.load(k_start_ptr + seq)
    klen = tl.load(k_end_ptr + seq) - k0

    rq, head, g_ok = _group_rows(hk, G, GP, BT)
    qi = m0 + rq
    row_ok = (qi < qlen) & g_ok
    lo, hi = _band(qi, klen, OFF, STRIDE, WINDOW, HAS_WINDOW)
    lo_first, _ = _band(m0, klen, OFF, STRIDE, WINDOW, HAS_WINDOW)
    _, hi_last = _band(tl.minimum(m0 + BT, qlen) - 1, klen, OFF, STRIDE, WINDOW, HAS_WINDOW)

    cols = tl.arange(0, BD)
    col_ok = cols < D
    cols_v = tl.arange(0, BDV)
    colv_ok = cols_v < DV
    tok = (q0 + qi).to(tl.int64)
    q = tl.load(q_ptr + (tok * stride_qt + head * stride_qh)[:, None] + (cols * stride_qd)[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    do = tl.load(do_ptr + (tok * stride_dot + head * stride_doh)[:, None] + (cols_v * stride_dod)[None, :],
                 mask=row_ok[:, None] & colv_ok[None, :], other=0.0)
    row = head.to(tl.int64) * stride_lh + tok
    lse = tl.load(lse_ptr + row, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + row, mask=row_ok, other=0.0)
    dq = tl.zeros((BT * GP, BD), dtype=tl.float32)

    n_start = (lo_first // BN) * BN
    offs_n = n_start + tl.arange(0, BN)
    k_base = k_ptr + k0.to(tl.int64) * stride_kt + hk * stride_kh
    v_base = v_ptr + k0.to(tl.int64) * stride_vt + hk * stride_vh
    for _n0 in range(n_start, hi_last, BN):
        n_ok = offs_n < klen
        rows = offs_n.to(tl.int64)
        k = tl.load(k_base + rows[:, None] * stride_kt + (cols * stride_kd)[None, :],
                    mask=n_ok[:, None] & col_ok[None, :], other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vt + (cols_v * stride_vd)[None, :],
                    mask=n_ok[:, None] & colv_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        # padding rows (q = dO = 0, lse = delta = 0) get dS = 0 whatever they keep: no row mask needed
        keep = offs_n[None, :] < hi[:, None]
        if HAS_WINDOW:
            keep = keep & (offs_n[None, :] >= lo[:, None])
        # masked before use: a row that saw nothing has lse = -inf and exp2 would give inf there
        p = tl.where(keep, tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        # dS without the scale, applied once at the store
        dq = tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, dq, input_precision=PREC)
        offs_n += BN
    tl.store(dq_ptr + (tok * stride_dqt + head * stride_dqh)[:, None] + cols[None, :],
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _band_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,  # as in _band_bwd_dq_kernel
    dk_ptr,  # [*, Hk, D] output in k's dtype, last dim contiguous
    dv_ptr,  # [*, Hk, Dv] output in v's dtype, last dim contiguous
    q_start_ptr, q_end_ptr, k_start_ptr, k_end_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dkt, stride_dkh,
    stride_dvt, stride_dvh,
    stride_lh,
    G, OFF, STRIDE, WINDOW,
    qk_scale, sm_scale,
    D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    GP: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PREC: tl.constexpr,
):
    """One program per (key tile, sequence, KV head): dK and dV summed over every query row of the group that
    sees the tile, in registers (no atomics)."""
    pid_n = tl.program_id(0)
    seq = tl.program_id(1)
    hk = tl.program_id(2)
    k0 = tl.load(k_start_ptr + seq)
    klen = tl.load(k_end_ptr + seq) - k0
    n0 = pid_n * BN
    if n0 >= klen:
        return
    q0 = tl.load(q_start_ptr + seq)
    qlen = tl.load(q_end_ptr + seq) - q0

    offs_n = n0 + tl.arange(0, BN)
    n_ok = offs_n < klen
    cols = tl.arange(0, BD)
    col_ok = cols < D
    cols_v = tl.arange(0, BDV)
    colv_ok = cols_v < DV
    kv_rows = (k0 + offs_n).to(tl.int64)
    k = tl.load(k_ptr + hk * stride_kh + kv_rows[:, None] * stride_kt + (cols * stride_kd)[None, :],
                mask=n_ok[:, None] & col_ok[None, :], other=0.0)
    v = tl.load(v_ptr + hk * stride_vh + kv_rows[:, None] * stride_vt + (cols_v * stride_vd)[None, :],
                mask=n_ok[:, None] & colv_ok[None, :], other=0.0)
    dk = tl.zeros((BN, BD), dtype=tl.float32)
    dv = tl.zeros((BN, BDV), dtype=tl.float32)

    # Queries that see a key of [n0, n0 + BN): hi(t) > n0 <=> t >= n0 * STRIDE + OFF; with a window also
    # lo(t) <= n0 + BN - 1 <=> t < (n0 + BN - 1 + WINDOW) * STRIDE + OFF.
    m_lo = n0 * STRIDE + OFF
    m_hi = qlen
    if HAS_WINDOW:
        m_hi = tl.minimum(qlen, (n0 + BN - 1 + WINDOW) * STRIDE + OFF)
    m_start = (m_lo // BT) * BT
    rq, head, g_ok = _group_rows(hk, G, GP, BT)
    qi = m_start + rq
    for _m0 in range(m_start, m_hi, BT):
        row_ok = (qi < qlen) & g_ok
        lo, hi = _band(qi, klen, OFF, STRIDE, WINDOW, HAS_WINDOW)
        tok = (q0 + qi).to(tl.int64)
        q = tl.load(q_ptr + (tok * stride_qt + head * stride_qh)[:, None] + (cols * stride_qd)[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        do = tl.load(do_ptr + (tok * stride_dot + head * stride_doh)[:, None] + (cols_v * stride_dod)[None, :],
                     mask=row_ok[:, None] & colv_ok[None, :], other=0.0)
        row = head.to(tl.int64) * stride_lh + tok
        lse = tl.load(lse_ptr + row, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + row, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PREC)  # [BN, M]: the scores transposed
        # padding rows (q = dO = 0, lse = delta = 0) add exactly 0 to dK and dV: no row mask needed
        keep = offs_n[:, None] < hi[None, :]
        if HAS_WINDOW:
            keep = keep & (offs_n[:, None] >= lo[None, :])
        pt = tl.where(keep, tl.math.exp2(st * qk_scale - lse[None, :]), 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dk = tl.dot((pt * (dpt - delta[None, :])).to(q.dtype), q, dk, input_precision=PREC)
        qi += BT
    tl.store(dk_ptr + hk * stride_dkh + kv_rows[:, None] * stride_dkt + cols[None, :],
             (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=n_ok[:, None] & col_ok[None, :])
    tl.store(dv_ptr + hk * stride_dvh + kv_rows[:, None] * stride_dvt + cols_v[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=n_ok[:, None] & colv_ok[None, :])


# --------------------------------------------------------------------------------------------------------
# Block scores and top-n selection


@triton.jit
def _overlap(j0, STRIDE, BLOCK, SEL, BC: tl.constexpr, NJ: tl.constexpr):
    """W [BC, NJ] fp32: overlap, in strides, of the compressed tokens 0 .. BC-1 of a step with the selection
    blocks j0 .. j0+NJ-1 counted from the step's first block (the reference's overlap_weights). The same for
    every step, since steps start on block boundaries."""
    start = tl.arange(0, BC) * STRIDE  # first position of each compressed token
    j = j0 + tl.arange(0, NJ)
    lo = tl.maximum(start[:, None], (j * SEL)[None, :])
    hi = tl.minimum(start[:, None] + BLOCK, ((j + 1) * SEL)[None, :])
    return tl.maximum(hi - lo, 0).to(tl.float32) / STRIDE


@triton.jit
def _spread(pg, w, USE_DOT: tl.constexpr):
    """pg [BT, BC] @ w [BC, NJ]: a dot when BT >= 16 (tl.dot's minimum), else a broadcast product and sum."""
    if USE_DOT:
        return tl.dot(pg, w, input_precision="ieee")
    else:
        return tl.sum(pg[:, :, None] * w[None, :, :], 1)


@triton.jit
def _block_scores_kernel(
    q_ptr,  # [*, H, D] queries (rows per sequence as in _band_fwd_kernel), any strides
    k_ptr,  # [*, Hk, D] compressed keys, any strides
    lse_ptr,  # [*, H] fp32 compressed-attention lse (natural log), any strides
    out_ptr,  # [*, Hk, NB] fp32 output scores, last dim contiguous
    q_start_ptr, q_end_ptr, k_start_ptr, k_end_ptr, pos0_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_lt, stride_lh,
    stride_ot, stride_oh,
    G,
    STRIDE,  # d
    BLOCK,  # l
    SEL,  # l'
    NB,  # blocks per score row
    qk_scale,
    D: tl.constexpr, BD: tl.constexpr,
    GP: tl.constexpr, BT: tl.constexpr,
    BC: tl.constexpr,  # compressed tokens per step, a multiple of l'/d: steps start on block boundaries
    NJ: tl.constexpr,  # selection blocks a step starts: BC * d / l'
    HAS_POS0: tl.constexpr,
    USE_DOT: tl.constexpr,  # BT >= 16: spread the probabilities over the blocks with tl.dot
    PREC: tl.constexpr,
):
    """One program per (query tile, sequence, KV head). Per step of BC compressed tokens: p = exp2(s - lse)
    over the visible ones, summed over the group's heads ([M, BC] -> [BT, BC]), spread over the NJ blocks the
    step starts and the NJ after them (tokens near the step's end reach past it, by up to l - d positions);
    the second part carries into the next step. Blocks past the last step are written as zeros."""
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    hk = tl.program_id(2)
    q0 = tl.load(q_start_ptr + seq)
    qlen = tl.load(q_end_ptr + seq) - q0
    m0 = pid_m * BT
    if m0 >= qlen:
        return
    k0 = tl.load(k_start_ptr + seq)
    klen = tl.load(k_end_ptr + seq) - k0
    pos0 = 0
    if HAS_POS0:
        pos0 = tl.load(pos0_ptr + seq)

    rq, head, g_ok = _group_rows(hk, G, GP, BT)
    qi = m0 + rq
    row_ok = (qi < qlen) & g_ok
    _, hi = _band(qi + pos0, klen, BLOCK - 1, STRIDE, 0, False)
    _, hi_last = _band(tl.minimum(m0 + BT, qlen) - 1 + pos0, klen, BLOCK - 1, STRIDE, 0, False)
    cols = tl.arange(0, BD)
    col_ok = cols < D
    tok = (q0 + qi).to(tl.int64)
    q = tl.load(q_ptr + (tok * stride_qt + head * stride_qh)[:, None] + (cols * stride_qd)[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    lse = tl.load(lse_ptr + tok * stride_lt + head * stride_lh, mask=row_ok, other=0.0) * 1.4426950408889634

    tq = m0 + tl.arange(0, BT)  # the tile's queries (rows of the output)
    t_ok = tq < qlen
    offs_j = tl.arange(0, NJ)
    out_ptrs = out_ptr + (q0 + tq).to(tl.int64)[:, None] * stride_ot + hk * stride_oh + offs_j[None, :]
    w_lo = _overlap(0, STRIDE, BLOCK, SEL, BC, NJ)  # onto the step's own NJ blocks
    w_hi = _overlap(NJ, STRIDE, BLOCK, SEL, BC, NJ)  # onto the NJ blocks after them
    offs_c = tl.arange(0, BC)
    k_base = k_ptr + k0.to(tl.int64) * stride_kt + hk * stride_kh
    carry = tl.zeros((BT, NJ), dtype=tl.float32)
    for c0 in range(0, hi_last, BC):
        kc = tl.load(k_base + offs_c.to(tl.int64)[:, None] * stride_kt + (cols * stride_kd)[None, :],
                     mask=(offs_c < klen)[:, None] & col_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kc), input_precision=PREC)
        keep = (offs_c[None, :] < hi[:, None]) & row_ok[:, None]
        p = tl.where(keep, tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)  # [M, BC]
        pg = tl.sum(tl.reshape(p, (BT, GP, BC)), 1)  # [BT, BC]: summed over the group's heads
        j_ok = (c0 // BC * NJ + offs_j) < NB
        tl.store(out_ptrs, carry + _spread(pg, w_lo, USE_DOT), mask=t_ok[:, None] & j_ok[None, :])
        carry = _spread(pg, w_hi, USE_DOT)
        offs_c += BC
        out_ptrs += NJ
    # the blocks after the last step: the carry, then zeros
    for jb in range(tl.cdiv(hi_last, BC) * NJ, NB, NJ):
        tl.store(out_ptrs, carry, mask=t_ok[:, None] & ((jb + offs_j) < NB)[None, :])
        carry = carry * 0.0
        out_ptrs += NJ


@triton.jit
def _topk_kernel(
    scores_ptr,  # [N, Hk, NB] float scores, any strides
    out_ptr,  # [N, Hk, S] int32 output block indices, any strides
    pos_ptr,  # [N] int32 position of each query in its sequence
    R,  # rows = N * Hk
    HK, NB,
    stride_st, stride_sh, stride_sj,
    stride_ot, stride_oh, stride_os,
    NSEL,  # S
    SEL,  # l'
    NUM_INIT, NUM_LOCAL,
    BR: tl.constexpr,  # rows (query, KV head) per program
    BJ: tl.constexpr,  # NB rounded up to a power of two
    BSEL: tl.constexpr,  # S rounded up to a power of two
):
    """Per row: the forced blocks (score +inf), then S rounds of "take the best available block, the lowest
    index among equals"; the chosen set is written in ascending order, then -1."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = rows < R
    tok = rows // HK
    kh = rows % HK
    pos = tl.load(pos_ptr + tok, mask=row_ok, other=0)
    cur = pos // SEL  # the block holding the query
    j = tl.arange(0, BJ)
    cand = row_ok[:, None] & (j[None, :] <= cur[:, None]) & (j[None, :] < NB)
    forced = cand & ((j[None, :] < NUM_INIT) | (j[None, :] > cur[:, None] - NUM_LOCAL))
    sc = tl.load(scores_ptr + tok.to(tl.int64)[:, None] * stride_st + kh[:, None] * stride_sh + j[None, :] * stride_sj,
                 mask=cand, other=float("-inf")).to(tl.float32)
    key = tl.where(forced, float("inf"), sc)
    sel = tl.zeros((BR, BJ), dtype=tl.int32) != 0  # all false
    for _ in range(NSEL):
        avail = cand & (~sel)
        best = tl.max(tl.where(avail, key, float("-inf")), 1)
        pick = tl.min(tl.where(avail & (key == best[:, None]), j[None, :], BJ), 1)  # BJ: nothing left
        sel = sel | (j[None, :] == pick[:, None])
    sel_i = sel.to(tl.int32)
    slot = tl.cumsum(sel_i, 1) - 1  # ascending block order
    count = tl.sum(sel_i, 1)
    out_row = out_ptr + tok.to(tl.int64) * stride_ot + kh * stride_oh
    tl.store(out_row[:, None] + slot * stride_os, j[None, :] + sel_i * 0, mask=sel)
    s = tl.arange(0, BSEL)
    pad = row_ok[:, None] & (s[None, :] >= count[:, None]) & (s[None, :] < NSEL)
    tl.store(out_row[:, None] + s[None, :] * stride_os, tl.full((BR, BSEL), -1, tl.int32), mask=pad)


# --------------------------------------------------------------------------------------------------------
# Selected-block attention


@triton.jit
def _sel_fwd_kernel(
    q_ptr,  # [N, H, D] queries, any strides
    k_ptr,  # [*, Hk, D] keys, any strides; query i's position p sits at row kstart[i] + p
    v_ptr,  # [*, Hk, Dv] values, same rows
    o_ptr,  # [N, H, Dv] output in q's dtype, last dim contiguous
    lse_ptr,  # [H, N] fp32 output (natural log)
    idx_ptr,  # [N, Hk, S] int32 selected blocks (-1: padding), any strides
    pos_ptr,  # [N] int32 query positions
    kstart_ptr,  # [N] int32 key row of position 0 of each query's sequence
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh,
    stride_it, stride_ih, stride_is,
    stride_lh,
    G, NSEL, SEL,  # heads per group, S, l'
    qk_scale,
    D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    MS: tl.constexpr,  # rows: the group's heads padded to >= 16
    BS: tl.constexpr,  # l' rounded up to a power of two (>= 16)
    PREC: tl.constexpr,
):
    """One program per (query, KV head): each selected block is loaded once and serves the G heads."""
    tok = tl.program_id(0)
    hk = tl.program_id(1)
    pos = tl.load(pos_ptr + tok)
    kstart = tl.load(kstart_ptr + tok)
    g = tl.arange(0, MS)
    row_ok = g < G
    head = hk * G + g
    cols = tl.arange(0, BD)
    col_ok = cols < D
    cols_v = tl.arange(0, BDV)
    colv_ok = cols_v < DV
    offs = tl.arange(0, BS)
    in_blk = offs < SEL
    tok64 = tok.to(tl.int64)
    q = tl.load(q_ptr + tok64 * stride_qt + (head * stride_qh)[:, None] + (cols * stride_qd)[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    # [BS, *] offsets of a block's rows from its first key; the block's first row is added per step
    k_base = k_ptr + kstart.to(tl.int64) * stride_kt + hk * stride_kh
    v_base = v_ptr + kstart.to(tl.int64) * stride_vt + hk * stride_vh
    # [BS, *] offsets of a block's rows from its first key (loop-invariant; the block's start is added per step:
    # with one query per program these small tiles fit registers, and ptxas keeps them there)
    offs64 = offs.to(tl.int64)
    k_off = offs64[:, None] * stride_kt + (cols * stride_kd)[None, :]
    v_off = offs64[:, None] * stride_vt + (cols_v * stride_vd)[None, :]
    m_i = tl.full((MS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((MS,), dtype=tl.float32)
    acc = tl.zeros((MS, BDV), dtype=tl.float32)
    idx_p = idx_ptr + tok64 * stride_it + hk * stride_ih
    for _s in range(NSEL):
        blk = tl.load(idx_p)
        first = blk * SEL  # position of the block's first key
        if (blk >= 0) & (first <= pos):  # padding and blocks wholly in the future are skipped
            ok = in_blk & (offs <= pos - first)  # at least the block's first key: every row gets a finite max
            k = tl.load(k_base + first.to(tl.int64) * stride_kt + k_off, mask=ok[:, None] & col_ok[None, :], other=0.0)
            s = tl.where(ok[None, :], tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + first.to(tl.int64) * stride_vt + v_off, mask=ok[:, None] & colv_ok[None, :],
                        other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
            m_i = m_new
        idx_p += stride_is
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(o_ptr + tok64 * stride_ot + (head * stride_oh)[:, None] + cols_v[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & colv_ok[None, :])
    tl.store(lse_ptr + head.to(tl.int64) * stride_lh + tok, lse, mask=row_ok)


@triton.jit
def _sel_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr,  # as in _sel_fwd_kernel
    do_ptr,  # [N, H, Dv] gradient of the output, any strides
    lse_ptr, delta_ptr,  # [H, N] fp32, row stride stride_lh
    dq_ptr,  # [N, H, D] output in q's dtype, last dim contiguous
    idx_ptr, pos_ptr, kstart_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dqt, stride_dqh,
    stride_it, stride_ih, stride_is,
    stride_lh,
    G, NSEL, SEL,
    qk_scale, sm_scale,
    D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    MS: tl.constexpr, BS: tl.constexpr,
    PREC: tl.constexpr,
):
    tok = tl.program_id(0)
    hk = tl.program_id(1)
    pos = tl.load(pos_ptr + tok)
    kstart = tl.load(kstart_ptr + tok)
    g = tl.arange(0, MS)
    row_ok = g < G
    head = hk * G + g
    cols = tl.arange(0, BD)
    col_ok = cols < D
    cols_v = tl.arange(0, BDV)
    colv_ok = cols_v < DV
    offs = tl.arange(0, BS)
    in_blk = offs < SEL
    tok64 = tok.to(tl.int64)
    q = tl.load(q_ptr + tok64 * stride_qt + (head * stride_qh)[:, None] + (cols * stride_qd)[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    do = tl.load(do_ptr + tok64 * stride_dot + (head * stride_doh)[:, None] + (cols_v * stride_dod)[None, :],
                 mask=row_ok[:, None] & colv_ok[None, :], other=0.0)
    row = head.to(tl.int64) * stride_lh + tok
    lse = tl.load(lse_ptr + row, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + row, mask=row_ok, other=0.0)
    k_base = k_ptr + kstart.to(tl.int64) * stride_kt + hk * stride_kh
    v_base = v_ptr + kstart.to(tl.int64) * stride_vt + hk * stride_vh
    offs64 = offs.to(tl.int64)
    k_off = offs64[:, None] * stride_kt + (cols * stride_kd)[None, :]
    v_off = offs64[:, None] * stride_vt + (cols_v * stride_vd)[None, :]
    dq = tl.zeros((MS, BD), dtype=tl.float32)
    idx_p = idx_ptr + tok64 * stride_it + hk * stride_ih
    for _s in range(NSEL):
        blk = tl.load(idx_p)
        first = blk * SEL
        if (blk >= 0) & (first <= pos):
            ok = in_blk & (offs <= pos - first)
            k = tl.load(k_base + first.to(tl.int64) * stride_kt + k_off, mask=ok[:, None] & col_ok[None, :], other=0.0)
            v = tl.load(v_base + first.to(tl.int64) * stride_vt + v_off, mask=ok[:, None] & colv_ok[None, :],
                        other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
            p = tl.where(ok[None, :] & row_ok[:, None], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            dq = tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, dq, input_precision=PREC)
        idx_p += stride_is
    tl.store(dq_ptr + tok64 * stride_dqt + (head * stride_dqh)[:, None] + cols[None, :],
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sel_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,  # as in _sel_bwd_dq_kernel
    pdk_ptr,  # [CH, BS, BD] fp32 output: this chunk's share of its block's dK (unscaled)
    pdv_ptr,  # [CH, BS, BDV] fp32 output: this chunk's share of dV
    qlist_ptr,  # [E] int32 query rows, grouped by the (block, KV head) they selected
    pos_ptr,  # [N] int32 query positions
    chunk_gid_ptr,  # [CH] int32 (block, KV head) id of each chunk = block * Hk + kv head; -1: unused chunk
    chunk_q0_ptr, chunk_q1_ptr,  # [CH] int32 the chunk's slice of qlist
    blk_k0_ptr,  # [NBLK] int32 key row of each block's first key
    blk_len_ptr,  # [NBLK] int32 keys in each block (l', or fewer at a sequence's end)
    blk_p0_ptr,  # [NBLK] int32 position of each block's first key
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_lh,
    HK, G,
    qk_scale,
    D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    GP: tl.constexpr,
    QT: tl.constexpr,  # queries per step (M = QT * GP rows)
    BS: tl.constexpr,
    PREC: tl.constexpr,
):
    """One program per chunk: the block's K/V tile stays in registers while the chunk's queries stream by,
    QT at a time with their G heads stacked as rows."""
    c = tl.program_id(0)
    gid = tl.load(chunk_gid_ptr + c)
    if gid < 0:
        return
    gb = gid // HK
    hk = gid % HK
    kr0 = tl.load(blk_k0_ptr + gb)
    klen = tl.load(blk_len_ptr + gb)
    p0 = tl.load(blk_p0_ptr + gb)
    offs = tl.arange(0, BS)
    k_ok = offs < klen
    cols = tl.arange(0, BD)
    col_ok = cols < D
    cols_v = tl.arange(0, BDV)
    colv_ok = cols_v < DV
    kv_rows = (kr0 + offs).to(tl.int64)
    k = tl.load(k_ptr + hk * stride_kh + kv_rows[:, None] * stride_kt + (cols * stride_kd)[None, :],
                mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    v = tl.load(v_ptr + hk * stride_vh + kv_rows[:, None] * stride_vt + (cols_v * stride_vd)[None, :],
                mask=k_ok[:, None] & colv_ok[None, :], other=0.0)
    dk = tl.zeros((BS, BD), dtype=tl.float32)
    dv = tl.zeros((BS, BDV), dtype=tl.float32)
    kpos = p0 + offs  # positions of the block's keys
    rq, head, g_ok = _group_rows(hk, G, GP, QT)
    head_l = head.to(tl.int64) * stride_lh
    i0 = tl.load(chunk_q0_ptr + c)
    i1 = tl.load(chunk_q1_ptr + c)
    ii = i0 + rq
    for _it in range(i0, i1, QT):
        row_ok = (ii < i1) & g_ok
        tok = tl.load(qlist_ptr + ii, mask=row_ok, other=0)
        pos = tl.load(pos_ptr + tok, mask=row_ok, other=0)
        tok64 = tok.to(tl.int64)
        q = tl.load(q_ptr + (tok64 * stride_qt + head * stride_qh)[:, None] + (cols * stride_qd)[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        do = tl.load(do_ptr + (tok64 * stride_dot + head * stride_doh)[:, None] + (cols_v * stride_dod)[None, :],
                     mask=row_ok[:, None] & colv_ok[None, :], other=0.0)
        lse = tl.load(lse_ptr + head_l + tok64, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + head_l + tok64, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PREC)  # [BS, M]
        keep = k_ok[:, None] & row_ok[None, :] & (kpos[:, None] <= pos[None, :])
        pt = tl.where(keep, tl.math.exp2(st * qk_scale - lse[None, :]), 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dk = tl.dot((pt * (dpt - delta[None, :])).to(q.dtype), q, dk, input_precision=PREC)
        ii += QT
    base = c.to(tl.int64) * BS + offs
    tl.store(pdk_ptr + base[:, None] * BD + cols[None, :], dk)
    tl.store(pdv_ptr + base[:, None] * BDV + cols_v[None, :], dv)


@triton.jit
def _sel_bwd_reduce_kernel(
    pdk_ptr, pdv_ptr,  # [CH, BS, BD] / [CH, BS, BDV] fp32 partial sums
    dk_ptr, dv_ptr,  # [N, Hk, D] / [N, Hk, Dv] outputs in k's / v's dtype, last dim contiguous
    ch_off_ptr,  # [NBLK * Hk + 1] int32: the chunks of id g are ch_off[g] .. ch_off[g+1]
    blk_k0_ptr, blk_len_ptr,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    HK,
    sm_scale,
    D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    BS: tl.constexpr,
):
    """One program per (block, KV head): the chunks' partial sums added in chunk order (deterministic); a
    block nobody selected gets zeros."""
    gid = tl.program_id(0)
    gb = gid // HK
    hk = gid % HK
    klen = tl.load(blk_len_ptr + gb)
    if klen <= 0:  # ids past the last block of the batch (the grid is an upper bound)
        return
    kr0 = tl.load(blk_k0_ptr + gb)
    c0 = tl.load(ch_off_ptr + gid)
    c1 = tl.load(ch_off_ptr + gid + 1)
    offs = tl.arange(0, BS)
    cols = tl.arange(0, BD)
    cols_v = tl.arange(0, BDV)
    dk = tl.zeros((BS, BD), dtype=tl.float32)
    dv = tl.zeros((BS, BDV), dtype=tl.float32)
    base = c0.to(tl.int64) * BS + offs
    pk = pdk_ptr + base[:, None] * BD + cols[None, :]
    pv = pdv_ptr + base[:, None] * BDV + cols_v[None, :]
    for _c in range(c0, c1):
        dk += tl.load(pk)
        dv += tl.load(pv)
        pk += BS * BD
        pv += BS * BDV
    k_ok = offs < klen
    kv_rows = (kr0 + offs).to(tl.int64)
    tl.store(dk_ptr + hk * stride_dkh + kv_rows[:, None] * stride_dkt + cols[None, :],
             (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=k_ok[:, None] & (cols < D)[None, :])
    tl.store(dv_ptr + hk * stride_dvh + kv_rows[:, None] * stride_dvt + cols_v[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=k_ok[:, None] & (cols_v < DV)[None, :])


# --------------------------------------------------------------------------------------------------------
# Gated sum of the three branches


@triton.jit
def _gate_combine_kernel(
    g_ptr,  # [R, 3] gates (contiguous), R = T * H rows
    a_ptr, b_ptr, c_ptr,  # [R, Dv] branch outputs (compressed, selected, window), contiguous
    o_ptr,  # forward: [R, Dv] output; backward: [R, Dv] gradient of the output (contiguous)
    da_ptr, db_ptr, dc_ptr,  # backward: [R, Dv] gradients of the branches (in their dtype)
    dg_ptr,  # backward: [R, 3] gradient of the gates (in their dtype)
    R,
    DV: tl.constexpr, BDV: tl.constexpr,
    BR: tl.constexpr,  # rows per program
    BWD: tl.constexpr,  # False: o = sum g_i x_i; True: dx_i = g_i do, dg_i = sum(do * x_i)
):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    r_ok = rows < R
    cols = tl.arange(0, BDV)
    mask = r_ok[:, None] & (cols[None, :] < DV)
    off = rows.to(tl.int64)[:, None] * DV + cols[None, :]
    g0 = tl.load(g_ptr + rows.to(tl.int64) * 3, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    g1 = tl.load(g_ptr + rows.to(tl.int64) * 3 + 1, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    g2 = tl.load(g_ptr + rows.to(tl.int64) * 3 + 2, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    a = tl.load(a_ptr + off, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if BWD:
        do = tl.load(o_ptr + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(da_ptr + off, (g0 * do).to(da_ptr.dtype.element_ty), mask=mask)
        tl.store(db_ptr + off, (g1 * do).to(db_ptr.dtype.element_ty), mask=mask)
        tl.store(dc_ptr + off, (g2 * do).to(dc_ptr.dtype.element_ty), mask=mask)
        dg_row = dg_ptr + rows.to(tl.int64) * 3
        tl.store(dg_row, tl.sum(do * a, 1).to(dg_ptr.dtype.element_ty), mask=r_ok)
        tl.store(dg_row + 1, tl.sum(do * b, 1).to(dg_ptr.dtype.element_ty), mask=r_ok)
        tl.store(dg_row + 2, tl.sum(do * c, 1).to(dg_ptr.dtype.element_ty), mask=r_ok)
    else:
        tl.store(o_ptr + off, (g0 * a + g1 * b + g2 * c).to(o_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Launchers: checks, tiles, layouts


def _prec(q: torch.Tensor) -> Optional[str]:
    """tl.dot's input precision: IEEE fp32 for fp32 inputs (TF32 would miss the fp32 tolerance); 16-bit
    inputs take the default (the flag only concerns fp32 operands)."""
    return "ieee" if q.dtype == torch.float32 else None


def _compiled(device: torch.device) -> bool:
    """True where the kernels are compiled for a GPU (tiles and warps sized for it); False under the CPU
    interpreter, where every program and loop step is a Python-level pass, so tiles are made larger."""
    return device.type == "cuda"


def _pow2(x: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(max(int(x), 1)))


def triton_reason(d: int, dv: int, block_size: int, stride: int, select_block_size: int) -> Optional[str]:
    """Why these kernels cannot run NSA with these head dims and geometry (None if they can)."""
    why = head_dims_reason(d, dv)
    if why is not None:
        return why
    r = select_block_size // stride if stride > 0 else 0
    if stride <= 0 or select_block_size % stride or r & (r - 1):
        return (f"the block-score kernel needs l' a multiple of d with l'/d a power of two "
                f"(l' = {select_block_size}, d = {stride})")
    if block_size - stride > 16 * select_block_size:
        return f"the block-score kernel needs l - d <= 16 l' (l = {block_size}, d = {stride}, l' = {select_block_size})"
    return None


def _check_qkv(where: str, q, k, v) -> None:
    for name, t, nd in (("q", q, 3), ("k", k, None), ("v", v, None)):
        if not isinstance(t, torch.Tensor) or (nd is not None and t.dim() != nd):
            raise ValueError(f"{where}: {name} must be a tensor with {nd} dims, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{where}: {name} must be float32 / float16 / bfloat16, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{where}: {name} is on {t.device}, q on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{where}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    h, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or h % hk or v.shape[-2] != hk or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{where}: need q [.., H, D], k [.., Hk, D], v [.., Hk, Dv] with H a multiple of Hk; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    why = head_dims_reason(q.shape[-1], v.shape[-1])
    if why is not None:
        raise ValueError(f"{where}: {why}")


def token_positions(cu_seqlens: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequence [T] int64, position [T] int32, key row of position 0 [T] int32) of every packed token,
    by device ops only (no host sync). Tokens past cu_seqlens[-1] get the last sequence's values."""
    tok = torch.arange(t, device=cu_seqlens.device, dtype=torch.int32)
    seq = torch.searchsorted(cu_seqlens[1:].contiguous(), tok, right=True).clamp_(max=max(cu_seqlens.numel() - 2, 0))
    start = cu_seqlens[seq]
    return seq, (tok - start).to(torch.int32), start.to(torch.int32)


def _band_tiles(device: torch.device, dtype: torch.dtype, gp: int, bwd: bool) -> dict:
    """Rows M (= BT * GP, the group's heads stacked) and keys BN per step, and launch options.

    GPU, 16-bit: the forward keeps a [M, D] query tile and a [M, Dv] fp32 accumulator, 128 x 64 with 8 warps
    (FlashAttention-2's Triton tiles); the backward holds two fp32 accumulators of a tile's width, 64 x 64 with
    8 warps (4 warps spill at D = 128: checked with ptxas -v for sm_90a). fp32 inputs take twice the registers:
    halved. Interpreter: every program costs a Python-level pass, so tiles are larger (fewer programs)."""
    if not _compiled(device):
        m, bn, opts = 128, 64, {}
    elif dtype == torch.float32:
        m, bn, opts = 32, 32, dict(num_warps=4, num_stages=2)
    elif not bwd:
        m, bn, opts = 128, 64, dict(num_warps=8, num_stages=2)
    else:
        m, bn, opts = 64, 64, dict(num_warps=8, num_stages=2)
    m = max(m, gp)
    return dict(BT=m // gp, BN=bn, opts=opts)


def _seq_arrays(cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start [B], end [B]) int32 views of cu_seqlens."""
    return cu[:-1], cu[1:]


def band_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_start: torch.Tensor, q_end: torch.Tensor, k_start: torch.Tensor, k_end: torch.Tensor,
    pos0: Optional[torch.Tensor], max_q: int,
    off: int, stride: int, window: Optional[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [Nq, H, Dv] in q's dtype, lse [H, Nq] fp32)`` of banded attention (module docstring): sequence b's
    queries are rows q_start[b] .. q_end[b] of q (at most ``max_q``), its keys rows k_start[b] .. k_end[b] of
    k / v (any leading layout: only the row stride is used), its first query at position pos0[b] (0 when
    None). Rows of q outside every sequence are left unwritten."""
    _check_qkv("r1kernels.triton.sparse.band_fwd", q, k, v)
    nq, h, d = q.shape
    hk, dv = k.shape[1], v.shape[-1]
    o = torch.empty((nq, h, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((h, nq), dtype=torch.float32, device=q.device)
    b = q_start.numel()
    if nq == 0 or b == 0 or max_q <= 0:
        return o, lse
    g = h // hk
    gp = _pow2(g)
    cfg = _band_tiles(q.device, q.dtype, gp, bwd=False)
    grid = (triton.cdiv(max_q, cfg["BT"]), b, hk)
    _band_fwd_kernel[grid](
        q, k, v, o, lse, q_start, q_end, k_start, k_end, pos0 if pos0 is not None else q_start,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), lse.stride(0),
        g, off, stride, window or 0, float(scale) * _LOG2E,
        D=d, BD=_pow2(d), DV=dv, BDV=_pow2(dv), GP=gp, BT=cfg["BT"], BN=cfg["BN"],
        HAS_WINDOW=window is not None, HAS_POS0=pos0 is not None, PREC=_prec(q), **cfg["opts"],
    )
    return o, lse


def _delta(o: torch.Tensor, do: torch.Tensor, dlse: Optional[torch.Tensor]) -> torch.Tensor:
    """[H, N] fp32 rowsum(dO * O) - dlse (the FlashAttention-2 preprocess; MLA's kernel)."""
    n, h, dv = o.shape
    delta = torch.empty((h, n), dtype=torch.float32, device=o.device)
    if n == 0 or h == 0:
        return delta
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    bt = 64 if _compiled(o.device) else _pow2(min(n, 1024), 16)
    _bwd_preprocess_kernel[(triton.cdiv(n, bt), h)](
        o, do, dlse if dlse is not None else delta, delta, n,
        o.stride(0), o.stride(1), do.stride(0), do.stride(1), do.stride(2), delta.stride(0),
        DV=dv, BDV=_pow2(dv), BT=bt, HAS_DLSE=dlse is not None,
    )
    return delta


def band_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
    off: int, stride: int, window: Optional[int], scale: float, dlse: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`band_fwd` for packed sequences (queries by ``cu_q``, keys by ``cu_k``, first
    query at position 0), from the forward's ``o`` and ``lse [H, Nq]``; ``dlse [H, Nq]`` optional. Key rows
    outside every sequence, and key tiles past ``max_k``, get zeros."""
    _check_qkv("r1kernels.triton.sparse.band_bwd", q, k, v)
    nq, h, d = q.shape
    hk, dvd = k.shape[1], v.shape[-1]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    b = cu_q.numel() - 1
    if nq == 0 or b == 0 or max_q <= 0:
        return dq.zero_(), dk, dv
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    delta = _delta(o, do, dlse)
    g = h // hk
    gp = _pow2(g)
    cfg = _band_tiles(q.device, q.dtype, gp, bwd=True)
    qs, qe = _seq_arrays(cu_q)
    ks, ke = _seq_arrays(cu_k)
    common = dict(D=d, BD=_pow2(d), DV=dvd, BDV=_pow2(dvd), GP=gp, BT=cfg["BT"], BN=cfg["BN"],
                  HAS_WINDOW=window is not None, PREC=_prec(q), **cfg["opts"])
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    band = (g, off, stride, window or 0, float(scale) * _LOG2E, float(scale))
    _band_bwd_dq_kernel[(triton.cdiv(max_q, cfg["BT"]), b, hk)](
        q, k, v, do, lse, delta, dq, qs, qe, ks, ke, *strides, dq.stride(0), dq.stride(1), lse.stride(0),
        *band, **common,
    )
    if max_k > 0:
        _band_bwd_dkdv_kernel[(triton.cdiv(max_k, cfg["BN"]), b, hk)](
            q, k, v, do, lse, delta, dk, dv, qs, qe, ks, ke, *strides,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), *band, **common,
        )
    return dq, dk, dv


def compressed_max_len(max_seqlen: int, block_size: int, stride: int) -> int:
    """Compressed tokens of the longest sequence: (max_seqlen - l) // d + 1, or 0."""
    return (max_seqlen - block_size) // stride + 1 if max_seqlen >= block_size else 0


def block_scores(
    q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor,
    q_start: torch.Tensor, q_end: torch.Tensor, k_start: torch.Tensor, k_end: torch.Tensor,
    pos0: Optional[torch.Tensor], max_q: int, num_blocks: int,
    block_size: int, stride: int, select_block_size: int, scale: float,
) -> torch.Tensor:
    """``scores [Nq, Hk, num_blocks]`` fp32 (``reference.nsa_block_scores``); queries and compressed keys laid
    out as for :func:`band_fwd`; ``lse`` ``[Nq, H]`` fp32, any strides."""
    where = "r1kernels.triton.sparse.block_scores"
    _check_qkv(where, q, k_cmp, k_cmp)
    why = triton_reason(q.shape[-1], q.shape[-1], block_size, stride, select_block_size)
    if why is not None:
        raise ValueError(f"{where}: {why}")
    nq, h, d = q.shape
    hk = k_cmp.shape[1]
    if lse.shape != (nq, h) or lse.dtype != torch.float32:
        raise ValueError(f"{where}: lse must be fp32 [{nq}, {h}], got {lse.dtype} {tuple(lse.shape)}")
    out = torch.empty((nq, hk, num_blocks), dtype=torch.float32, device=q.device)
    b = q_start.numel()
    if nq == 0 or b == 0 or max_q <= 0 or num_blocks == 0:
        return out.zero_()
    g = h // hk
    gp = _pow2(g)
    bt = max(1, (64 if _compiled(q.device) else 128) // gp)  # M = 64 rows (interpreter: 128, fewer programs)
    r = select_block_size // stride
    bc = 16 * r
    opts = dict(num_warps=4, num_stages=2) if _compiled(q.device) else {}
    _block_scores_kernel[(triton.cdiv(max_q, bt), b, hk)](
        q, k_cmp, lse, out, q_start, q_end, k_start, k_end, pos0 if pos0 is not None else q_start,
        q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        g, stride, block_size, select_block_size, num_blocks, float(scale) * _LOG2E,
        D=d, BD=_pow2(d), GP=gp, BT=bt, BC=bc, NJ=16, HAS_POS0=pos0 is not None, USE_DOT=bt >= 16,
        PREC=_prec(q), **opts,
    )
    return out


def topk_blocks(
    scores: torch.Tensor, pos: torch.Tensor, num_selected: int, select_block_size: int, num_init: int,
    num_local: int,
) -> torch.Tensor:
    """``block_idx [N, Hk, n]`` int32 (``reference.nsa_topk_blocks``) for score rows ``[N, Hk, NB]`` of queries
    at positions ``pos [N]`` int32."""
    where = "r1kernels.triton.sparse.topk_blocks"
    if scores.dim() != 3 or scores.dtype not in _FLOATS:
        raise ValueError(f"{where}: scores must be float [N, Hk, NB], got {scores.dtype} {tuple(scores.shape)}")
    n, hk, nb = scores.shape
    if pos.shape != (n,) or pos.dtype != torch.int32:
        raise ValueError(f"{where}: pos must be int32 [{n}], got {pos.dtype} {tuple(pos.shape)}")
    out = torch.empty((n, hk, num_selected), dtype=torch.int32, device=scores.device)
    if out.numel() == 0:
        return out
    if nb == 0:
        return out.fill_(-1)
    bj = _pow2(nb, 16)
    budget = 4096 if _compiled(scores.device) else 65536
    br = max(1, min(_pow2(n * hk), budget // bj))
    opts = dict(num_warps=4) if _compiled(scores.device) else {}
    _topk_kernel[(triton.cdiv(n * hk, br),)](
        scores, out, pos, n * hk, hk, nb,
        scores.stride(0), scores.stride(1), scores.stride(2), out.stride(0), out.stride(1), out.stride(2),
        num_selected, select_block_size, num_init, num_local,
        BR=br, BJ=bj, BSEL=_pow2(num_selected), **opts,
    )
    return out


def _sel_tiles(device: torch.device, g: int, select_block_size: int) -> dict:
    gp = _pow2(g)
    return dict(GP=gp, MS=max(16, gp), BS=_pow2(select_block_size, 16),
                opts=dict(num_warps=4, num_stages=2) if _compiled(device) else {})


def selected_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
    pos: torch.Tensor, kstart: torch.Tensor, select_block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [N, H, Dv] in q's dtype, lse [H, N] fp32)`` of selected-block attention: query i at position
    pos[i] reads the keys of its blocks block_idx[i] at rows kstart[i] + position of k / v."""
    where = "r1kernels.triton.sparse.selected_fwd"
    _check_qkv(where, q, k, v)
    n, h, d = q.shape
    hk, dv = k.shape[-2], v.shape[-1]
    if block_idx.dim() != 3 or block_idx.shape[:2] != (n, hk) or block_idx.dtype != torch.int32:
        raise ValueError(f"{where}: block_idx must be int32 [{n}, {hk}, S], got {block_idx.dtype} "
                         f"{tuple(block_idx.shape)}")
    o = torch.empty((n, h, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((h, n), dtype=torch.float32, device=q.device)
    if n == 0 or h == 0:
        return o, lse
    c = _sel_tiles(q.device, h // hk, select_block_size)
    _sel_fwd_kernel[(n, hk)](
        q, k, v, o, lse, block_idx, pos, kstart,
        q.stride(0), q.stride(1), q.stride(2), k.stride(-3), k.stride(-2), k.stride(-1),
        v.stride(-3), v.stride(-2), v.stride(-1), o.stride(0), o.stride(1),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2), lse.stride(0),
        h // hk, block_idx.shape[2], select_block_size, float(scale) * _LOG2E,
        D=d, BD=_pow2(d), DV=dv, BDV=_pow2(dv), MS=c["MS"], BS=c["BS"], PREC=_prec(q), **c["opts"],
    )
    return o, lse


def _selection_lists(block_idx: torch.Tensor, cu_seqlens: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor,
                     select_block_size: int, chunk: int) -> dict:
    """The inverse of the selection, by device ops only: for every (block, KV head) id g = block * Hk + kv head
    (blocks numbered through the batch), the query rows that selected it, cut into chunks of <= ``chunk``.

    Sizes are static upper bounds (no host sync): NBLK = ceil(T / l') + B blocks, CH = NBLK Hk + ceil(E / chunk)
    chunks for E = T Hk S entries. Entries that cannot touch a key (padding, blocks past the sequence or wholly
    after the query) are dropped."""
    t, hk, s = block_idx.shape
    dev = block_idx.device
    nseq = cu_seqlens.numel() - 1
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    nblk = torch.div(lens + select_block_size - 1, select_block_size, rounding_mode="floor")  # [B]
    blk_off = torch.cat([nblk.new_zeros(1), nblk.cumsum(0)])  # [B + 1] first block id of each sequence
    nblk_max = triton.cdiv(t, select_block_size) + nseq
    ng = nblk_max * hk

    j = block_idx.long()
    sq = seq[:, None, None]
    ok = (j >= 0) & (j < nblk[sq]) & (j * select_block_size <= pos.long()[:, None, None])
    gid = (blk_off[sq] + j) * hk + torch.arange(hk, device=dev)[None, :, None]
    key = torch.where(ok, gid, ng).reshape(-1)
    sorted_key, order = torch.sort(key, stable=True)
    qlist = torch.div(order, hk * s, rounding_mode="floor").to(torch.int32)
    offs = torch.searchsorted(sorted_key, torch.arange(ng + 1, device=dev))  # [NG + 1] CSR offsets
    nch = torch.div(offs[1:] - offs[:-1] + chunk - 1, chunk, rounding_mode="floor")
    ch_off = torch.cat([nch.new_zeros(1), nch.cumsum(0)])  # [NG + 1]
    n_chunks = ng + triton.cdiv(key.numel(), chunk)
    c = torch.arange(n_chunks, device=dev)
    cg = torch.searchsorted(ch_off[1:], c, right=True)  # the id whose chunks hold c (ng: unused chunk)
    cgc = cg.clamp(max=ng - 1)
    q0 = offs[cgc] + (c - ch_off[cgc]) * chunk
    q1 = torch.minimum(q0 + chunk, offs[cgc + 1])

    gb = torch.arange(nblk_max, device=dev)
    bseq = torch.searchsorted(blk_off[1:], gb, right=True)
    real = bseq < nseq
    bseq = bseq.clamp(max=max(nseq - 1, 0))
    jb = gb - blk_off[bseq]
    blk_len = torch.where(real, (lens[bseq] - jb * select_block_size).clamp(0, select_block_size), 0)
    i32 = torch.int32
    return dict(
        qlist=qlist, chunk_gid=torch.where(cg < ng, cg, -1).to(i32), chunk_q0=q0.to(i32), chunk_q1=q1.to(i32),
        ch_off=ch_off.to(i32), blk_k0=(cu_seqlens.long()[bseq] + jb * select_block_size).to(i32),
        blk_len=blk_len.to(i32), blk_p0=(jb * select_block_size).to(i32), n_chunks=n_chunks, n_ids=ng,
    )


def selected_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    block_idx: torch.Tensor, cu_seqlens: torch.Tensor, select_block_size: int, scale: float,
    chunk: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`selected_fwd` over packed sequences (``cu_seqlens``; ``cu_seqlens[-1] == T``).

    dq: one program per (query, KV head), like the forward. dK / dV: per chunk of the inverse lists a program
    sums the chunk's queries into fp32 partials [CH, BS, BD] (CH bounded as in :func:`_selection_lists`:
    at T = 64k, Hk = 4, S = 16, l' = 64, D = Dv = 128 about 0.5 GB), then one program per (block, KV head) adds
    its chunks in order. Block ids are static bounds: no host sync. ``chunk`` (queries per chunk) is chosen
    from the sizes when None; tests set it small to cut blocks into many chunks."""
    where = "r1kernels.triton.sparse.selected_bwd"
    _check_qkv(where, q, k, v)
    n, h, d = q.shape
    hk, dvd = k.shape[1], v.shape[-1]
    dq = torch.empty((n, h, d), dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if n == 0 or h == 0:
        return dq, dk.zero_(), dv.zero_()
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    seq, pos, kstart = token_positions(cu_seqlens, n)
    delta = _delta(o, do, None)
    g = h // hk
    c = _sel_tiles(q.device, g, select_block_size)
    dims = dict(D=d, BD=_pow2(d), DV=dvd, BDV=_pow2(dvd))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    _sel_bwd_dq_kernel[(n, hk)](
        q, k, v, do, lse, delta, dq, block_idx, pos, kstart, *strides, dq.stride(0), dq.stride(1),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2), lse.stride(0),
        g, block_idx.shape[2], select_block_size, float(scale) * _LOG2E, float(scale),
        MS=c["MS"], BS=c["BS"], PREC=_prec(q), **dims, **c["opts"],
    )

    # queries per step of the dK / dV programs: M = 64 rows (interpreter: 128, fewer steps)
    qt = max(1, (64 if _compiled(q.device) else 128) // c["GP"])
    e = n * hk * block_idx.shape[2]
    nblk_max = triton.cdiv(n, select_block_size) + cu_seqlens.numel() - 1
    if chunk is None:
        # about two chunks per (block, KV head) on average, so partials stay near 2 x the K/V blocks' fp32 size
        chunk = qt * max(4, _pow2(triton.cdiv(e, nblk_max * hk * qt)))
    elif chunk < 1:
        raise ValueError(f"{where}: chunk must be >= 1, got {chunk}")
    lists = _selection_lists(block_idx, cu_seqlens, seq, pos, select_block_size, chunk)
    bs = c["BS"]
    pdk = torch.empty((lists["n_chunks"], bs, dims["BD"]), dtype=torch.float32, device=q.device)
    pdv = torch.empty((lists["n_chunks"], bs, dims["BDV"]), dtype=torch.float32, device=q.device)
    _sel_bwd_dkdv_kernel[(lists["n_chunks"],)](
        q, k, v, do, lse, delta, pdk, pdv, lists["qlist"], pos, lists["chunk_gid"], lists["chunk_q0"],
        lists["chunk_q1"], lists["blk_k0"], lists["blk_len"], lists["blk_p0"], *strides, lse.stride(0),
        hk, g, float(scale) * _LOG2E, GP=c["GP"], QT=qt, BS=bs, PREC=_prec(q), **dims,
        # two fp32 [BS, D] accumulators next to [M, D] query / dO tiles: 8 warps keep them in registers
        **(dict(num_warps=8, num_stages=2) if _compiled(q.device) else {}),
    )
    _sel_bwd_reduce_kernel[(lists["n_ids"],)](
        pdk, pdv, dk, dv, lists["ch_off"], lists["blk_k0"], lists["blk_len"],
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), hk, float(scale), BS=bs, **dims,
    )
    return dq, dk, dv


def gate_combine_fwd(gates: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """o = g0 a + g1 b + g2 c per row, in fp32, rounded once to a's dtype. gates ``[.., H, 3]``, branches
    ``[.., H, Dv]`` (made contiguous)."""
    gates, a, b, c = (x.contiguous() for x in (gates, a, b, c))
    o = torch.empty_like(a)
    rows, dv = a.numel() // max(a.shape[-1], 1), a.shape[-1]
    if o.numel() == 0:
        return o
    br = max(1, 2048 // _pow2(dv)) if _compiled(a.device) else max(1, 65536 // _pow2(dv))
    _gate_combine_kernel[(triton.cdiv(rows, br),)](gates, a, b, c, o, a, b, c, gates, rows,
                                                   DV=dv, BDV=_pow2(dv), BR=br, BWD=False)
    return o


def gate_combine_bwd(do: torch.Tensor, gates: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
    """``(dgates, da, db, dc)`` of :func:`gate_combine_fwd` (dgates in the gates' dtype)."""
    do, gates, a, b, c = (x.contiguous() for x in (do, gates, a, b, c))
    da, db, dc = torch.empty_like(a), torch.empty_like(b), torch.empty_like(c)
    dg = torch.empty_like(gates)
    rows, dv = a.numel() // max(a.shape[-1], 1), a.shape[-1]
    if a.numel() == 0:
        return dg.zero_(), da, db, dc
    br = max(1, 2048 // _pow2(dv)) if _compiled(a.device) else max(1, 65536 // _pow2(dv))
    _gate_combine_kernel[(triton.cdiv(rows, br),)](gates, a, b, c, do, da, db, dc, dg, rows,
                                                   DV=dv, BDV=_pow2(dv), BR=br, BWD=True)
    return dg, da, db, dc


def _cache_rows(cache: torch.Tensor, name: str) -> torch.Tensor:
    """Row offset (in units of the cache's token stride) of each sequence's first row of a ``[B, S, Hk, *]``
    cache, so that the kernels address it as rows; needs the batch stride to be a multiple of the token
    stride (any slice of a larger cache along S or the head dims is)."""
    sb, st = cache.stride(0), cache.stride(1)
    if st <= 0 or sb % st:
        raise ValueError(f"r1kernels.triton.sparse.nsa_decode: {name}'s batch stride {sb} must be a multiple of "
                         f"its token stride {st}")
    return torch.arange(cache.shape[0], device=cache.device, dtype=torch.int32) * (sb // st)


def nsa_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_cmp_cache: torch.Tensor,
    v_cmp_cache: torch.Tensor, seqlens: torch.Tensor, cmp_lens: torch.Tensor, gates: torch.Tensor,
    block_size: int, stride: int, select_block_size: int, num_selected: int, window: int, num_init: int,
    num_local: int, scale: float,
) -> torch.Tensor:
    """One NSA decode step (``reference.nsa_decode``) from the prefill kernels, each sequence one query at
    position seqlens[b] - 1: compressed attention over the compressed cache (band_fwd), its block scores
    (a second pass over k_cmp), top-n, the selected blocks (selected_fwd), the window (band_fwd), the gated
    sum. Caches are addressed in place through their strides (no copy); rows past seqlens / cmp_lens are never
    read."""
    b, h, d = q.shape
    smax = k_cache.shape[1]
    q_start = torch.arange(b, dtype=torch.int32, device=q.device)
    q_end = q_start + 1
    pos = (seqlens - 1).to(torch.int32)
    seqlens, cmp_lens = seqlens.to(torch.int32), cmp_lens.to(torch.int32)
    for kt, vt, name in ((k_cmp_cache, v_cmp_cache, "cmp_cache"), (k_cache, v_cache, "cache")):
        if vt.stride(0) * kt.stride(1) != kt.stride(0) * vt.stride(1):
            raise ValueError(f"r1kernels.triton.sparse.nsa_decode: k_{name} and v_{name} must have the same rows "
                             f"per sequence (batch stride / token stride)")
    c_start = _cache_rows(k_cmp_cache, "k_cmp_cache")
    k_start = _cache_rows(k_cache, "k_cache")

    def rows(t: torch.Tensor) -> torch.Tensor:
        """[B, S, Hk, *] as [B * S, Hk, *] rows with the token stride (a view, inside the storage; the kernels
        address sequence b from row b * batch stride / token stride)."""
        return t.as_strided((t.shape[0] * t.shape[1], t.shape[2], t.shape[3]), (t.stride(1), t.stride(2), t.stride(3)))

    kc, vc, kr, vr = rows(k_cmp_cache), rows(v_cmp_cache), rows(k_cache), rows(v_cache)
    o_cmp, lse = band_fwd(q, kc, vc, q_start, q_end, c_start, c_start + cmp_lens, pos, 1,
                          block_size - 1, stride, None, scale)
    nb = triton.cdiv(smax, select_block_size)
    scores = block_scores(q, kc, lse.t(), q_start, q_end, c_start, c_start + cmp_lens, pos, 1, nb,
                          block_size, stride, select_block_size, scale)
    block_idx = topk_blocks(scores, pos, num_selected, select_block_size, num_init, num_local)
    o_sel, _ = selected_fwd(q, kr, vr, block_idx, pos, k_start, select_block_size, scale)
    o_win, _ = band_fwd(q, kr, vr, q_start, q_end, k_start, k_start + seqlens, pos, 1, 0, 1, window, scale)
    return gate_combine_fwd(gates, o_cmp, o_sel, o_win)
