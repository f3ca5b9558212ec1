"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2) in Triton: the lightning indexer (forward and backward),
a sort-free top-k, sparse absorbed-MLA attention over selected latent rows (packed prefill forward and
backward, paged decode forward) and the indexer's KL warm-up loss. Semantics: ``r1kernels.reference.sparse_dsa``.

Letters:
    B batch (sequences / requests), S query tokens per sequence, T key tokens, Hi indexer heads, Di indexer
    head dim, H query heads, C latent row width (L + R), V = head_dim_v (the value width, L in V3), K selected
    positions per query, N cache pages, P page size, M block-table width. Tt packed tokens of a prefill.
    Attention kernels see Q query tokens: Q = Tt (prefill) or B * S (decode); token r of a decode is
    (request r // S, query r % S), of a prefill (r, 0) with S_per = 1, so one kernel addresses both.
    Tiles: BS queries x BT keys (indexer, top-k, loss), BD >= Di; BLOCK_H heads x BLOCK_K selected rows,
    BLOCK_V >= V value columns and BLOCK_R >= C - V key-only columns (attention); ROWS rows per program.

Indexer: ``I[b, s, t] = sum_j w[b, s, j] * relu(q[b, s, j] . k[b, t])``, -inf for ``t > q_positions[b, s]``.
    forward, grid (T tiles, S tiles, B): the key tile is loaded once and serves the Hi heads; tiles past
    every query's position are written -inf without a load.
    backward: with g = dI (0 where masked) and dz = g * w_j * [q_j.k > 0]: dw_j = sum_t g * relu(q_j.k),
    dq_j = dz @ k (grid (S tiles, B), heads outer, keys inner), dk = sum_j dz^T @ q_j (grid (T tiles, B),
    query tiles that see nothing of the key tile skipped). Each output element has one writer: no atomics.

Top-k (sort-free): per row, a bisection over order-preserving integer keys of the fp32 scores finds the K-th
    largest visible key tau exactly (32 counting passes: the keys span 2^32 values). Selected = keys > tau,
    plus the lowest-position ties at tau until K are taken. Positions are written in ascending order via a
    running prefix sum, then -1 fills the slots left. No sort anywhere; the set is the reference's exactly.

Sparse attention (absorbed MLA, one shared latent K/V head): a program takes one query token, BLOCK_H of
    its heads and (decode) one split of its K selections. Each gathered tile of rows serves all BLOCK_H
    heads; q.k is two dots over the value columns [0, V) and the rest [V, C); the value columns of the same
    tile are V for p.v. Online softmax in base 2, fp32 accumulators. Selections that are -1 or at or past
    the sequence's length are masked at the load (a NaN in an unused cache slot never reaches a register).
    Decode with several splits writes normalised partials that ``mla_decode``'s merge kernel combines.
    Backward (prefill), grid (Tt, head blocks): p is recomputed from the saved lse; delta = rowsum(dO * O)
    - dlse; ds = p * (dp - delta); dq accumulates in registers, dkv rows are scattered with fp32 atomic adds
    (many queries select one row; the order of those adds, hence the last bits of dkv, varies on a GPU).

KL loss: one pass per row gives lse(scores), Z = sum target, sum target * log target and sum target *
    score, from which KL(target / Z || softmax(scores)) follows; the backward is elementwise.

No launcher reads device data: grids and block sizes come from shapes only.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import persistent_programs
from .mla import _dot
from .mla_decode import _decode_merge_kernel

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634  # scores are kept in base 2 (exp2 is the hardware exponential)
_LN2 = 0.6931471805599453
MAX_ROW = 1024  # widest latent row C (and indexer head dim) the attention tiles are sized for
MAX_INDEX_DIM = 256


# --------------------------------------------------------------------------------------------------------
# Lightning indexer


@triton.jit
def _indexer_fwd_kernel(
    q_ptr,  # [B, S, Hi, Di] indexer queries, any strides
    k_ptr,  # [B, T, Di] indexer keys, q's dtype, any strides
    w_ptr,  # [B, S, Hi] head weights (any float dtype, read as fp32), any strides
    pos_ptr,  # [B, S] int64 query positions, any strides
    out_ptr,  # [B, S, T] fp32 scores, contiguous
    S, T, Hi, Di,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_wb, stride_ws, stride_wh,
    stride_pb, stride_ps,
    BS: tl.constexpr,  # queries per program
    BT: tl.constexpr,  # keys per program
    BD: tl.constexpr,  # power of two >= Di (>= 16)
    IEEE: tl.constexpr,  # fp32 inputs: full-precision dots
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_s = pid_s * BS + tl.arange(0, BS)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    s_ok = offs_s < S
    t_ok = offs_t < T
    d_ok = offs_d < Di
    qpos = tl.load(pos_ptr + b * stride_pb + offs_s * stride_ps, mask=s_ok, other=-1)  # [BS] int64
    last = tl.max(qpos, axis=0)  # the furthest key any query of the tile sees
    acc = tl.zeros([BS, BT], dtype=tl.float32)
    if pid_t * BT <= last:  # else every score of the tile is masked: nothing to load or multiply
        # Keys past `last` are not loaded: whatever they hold (NaN in unused slots) stays out of the dots.
        k_ok = t_ok & (offs_t <= last)
        k = tl.load(k_ptr + b * stride_kb + offs_t.to(tl.int64)[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [BT, BD], serves every head
        q_row = q_ptr + b * stride_qb + offs_s.to(tl.int64) * stride_qs  # [BS]
        w_row = w_ptr + b * stride_wb + offs_s.to(tl.int64) * stride_ws
        for j in range(0, Hi):
            qj = tl.load(q_row[:, None] + j * stride_qh + offs_d[None, :] * stride_qd,
                         mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # [BS, BD]
            wj = tl.load(w_row + j * stride_wh, mask=s_ok, other=0.0).to(tl.float32)  # [BS]
            z = _dot(qj, tl.trans(k), None, IEEE)  # [BS, BT] fp32
            acc += wj[:, None] * tl.maximum(z, 0.0)
    visible = offs_t[None, :] <= qpos[:, None]
    out = tl.where(visible, acc, float("-inf"))
    o_offs = (b * S + offs_s.to(tl.int64))[:, None] * T + offs_t[None, :]
    tl.store(out_ptr + o_offs, out, mask=s_ok[:, None] & t_ok[None, :])


@triton.jit
def _indexer_bwd_dq_kernel(
    q_ptr, k_ptr, w_ptr, pos_ptr,  # as in the forward
    g_ptr,  # [B, S, T] gradient of the scores, any strides (read as fp32; masked entries ignored)
    dq_ptr,  # [B, S, Hi, Di] output in q's dtype, contiguous
    dw_ptr,  # [B, S, Hi] output in w's dtype, contiguous
    S, T, Hi, Di,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_wb, stride_ws, stride_wh,
    stride_pb, stride_ps,
    stride_gb, stride_gs, stride_gt,
    BS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr,
):
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, BD)
    s_ok = offs_s < S
    d_ok = offs_d < Di
    qpos = tl.load(pos_ptr + b * stride_pb + offs_s * stride_ps, mask=s_ok, other=-1)  # [BS] int64
    # Keys at or past t_hi are seen by no query of the tile: neither loaded nor visited.
    t_hi = tl.minimum(tl.max(qpos, axis=0) + 1, T).to(tl.int32)
    q_row = q_ptr + b * stride_qb + offs_s.to(tl.int64) * stride_qs
    w_row = w_ptr + b * stride_wb + offs_s.to(tl.int64) * stride_ws
    g_row = g_ptr + b * stride_gb + offs_s.to(tl.int64) * stride_gs
    sd_ok = s_ok[:, None] & d_ok[None, :]
    for j in range(0, Hi):
        qj = tl.load(q_row[:, None] + j * stride_qh + offs_d[None, :] * stride_qd, mask=sd_ok, other=0.0)
        wj = tl.load(w_row + j * stride_wh, mask=s_ok, other=0.0).to(tl.float32)
        dq = tl.zeros([BS, BD], dtype=tl.float32)
        dw = tl.zeros([BS], dtype=tl.float32)
        for t0 in range(0, t_hi, BT):
            offs_t = t0 + tl.arange(0, BT)
            t_ok = offs_t < t_hi
            k = tl.load(k_ptr + b * stride_kb + offs_t.to(tl.int64)[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0)  # [BT, BD]
            g = tl.load(g_row[:, None] + offs_t[None, :] * stride_gt, mask=s_ok[:, None] & t_ok[None, :], other=0.0)
            # A masked score is the constant -inf: whatever gradient arrives there (even NaN) is dropped.
            g = tl.where(offs_t[None, :] <= qpos[:, None], g.to(tl.float32), 0.0)
            z = _dot(qj, tl.trans(k), None, IEEE)  # [BS, BT]
            dw += tl.sum(g * tl.maximum(z, 0.0), axis=1)
            dz = tl.where(z > 0.0, g * wj[:, None], 0.0)  # relu' is 0 at 0, as torch's
            dq = _dot(dz, k, dq, IEEE)
        dq_offs = ((b * S + offs_s.to(tl.int64)) * Hi + j)[:, None] * Di + offs_d[None, :]
        tl.store(dq_ptr + dq_offs, dq.to(dq_ptr.dtype.element_ty), mask=sd_ok)
        tl.store(dw_ptr + (b * S + offs_s.to(tl.int64)) * Hi + j, dw.to(dw_ptr.dtype.element_ty), mask=s_ok)


@triton.jit
def _indexer_bwd_dk_kernel(
    q_ptr, k_ptr, w_ptr, pos_ptr, g_ptr,  # as in _indexer_bwd_dq_kernel
    dk_ptr,  # [B, T, Di] output in k's dtype, contiguous
    S, T, Hi, Di,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_wb, stride_ws, stride_wh,
    stride_pb, stride_ps,
    stride_gb, stride_gs, stride_gt,
    BS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t0 = pid_t * BT
    offs_t = t0 + tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    t_ok = offs_t < T
    d_ok = offs_d < Di
    k = tl.load(k_ptr + b * stride_kb + offs_t.to(tl.int64)[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=t_ok[:, None] & d_ok[None, :], other=0.0)  # [BT, BD], stays for the whole walk
    dk = tl.zeros([BT, BD], dtype=tl.float32)
    for s0 in range(0, S, BS):
        offs_s = s0 + tl.arange(0, BS)
        s_ok = offs_s < S
        qpos = tl.load(pos_ptr + b * stride_pb + offs_s * stride_ps, mask=s_ok, other=-1)
        if tl.max(qpos, axis=0) >= t0:  # some query of this block sees a key of this tile
            g = tl.load(g_ptr + b * stride_gb + offs_s.to(tl.int64)[:, None] * stride_gs + offs_t[None, :] * stride_gt,
                        mask=s_ok[:, None] & t_ok[None, :], other=0.0)
            g = tl.where(offs_t[None, :] <= qpos[:, None], g.to(tl.float32), 0.0)  # [BS, BT]
            q_row = q_ptr + b * stride_qb + offs_s.to(tl.int64) * stride_qs
            w_row = w_ptr + b * stride_wb + offs_s.to(tl.int64) * stride_ws
            for j in range(0, Hi):
                qj = tl.load(q_row[:, None] + j * stride_qh + offs_d[None, :] * stride_qd,
                             mask=s_ok[:, None] & d_ok[None, :], other=0.0)
                wj = tl.load(w_row + j * stride_wh, mask=s_ok, other=0.0).to(tl.float32)
                z = _dot(qj, tl.trans(k), None, IEEE)  # [BS, BT]; a NaN key gives NaN > 0 = False below
                dz = tl.where(z > 0.0, g * wj[:, None], 0.0)
                dk = _dot(tl.trans(dz), qj, dk, IEEE)
    dk_offs = (b * T + offs_t.to(tl.int64))[:, None] * Di + offs_d[None, :]
    tl.store(dk_ptr + dk_offs, dk.to(dk_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------------------
# Top-k


@triton.jit
def _topk_keys(row_ptr, cols, n, stride_t):
    """Order-preserving int64 keys of a [ROWS, BT] tile of scores; invisible entries get the smallest key.

    row_ptr [ROWS] pointers at each row's position 0, cols [BT] positions, n [ROWS] visible length. An fp32's
    bits read as int32 order the non-negative floats; flipping the low 31 bits of a negative one reverses
    its order, so the keys compare like the floats (-0.0 is mapped onto +0.0: the floats are equal).
    Visible = position < n and score > -inf (NaN compares false, so it is never visible).
    """
    inside = cols[None, :] < n[:, None]
    x = tl.load(row_ptr[:, None] + cols[None, :] * stride_t, mask=inside, other=float("-inf")).to(tl.float32)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(x == 0.0, 0, key).to(tl.int64)
    return tl.where(inside & (x > float("-inf")), key, -2147483648)


@triton.jit
def _topk_kernel(
    x_ptr,  # [B, S, T] scores (any float dtype), any strides
    len_ptr,  # [B] int32 visible keys per sequence, stride stride_len
    out_ptr,  # [B * S, K] int32 selected positions, contiguous
    R,  # rows = B * S
    S, T, K,
    stride_xb, stride_xs, stride_xt,
    stride_len,
    ROWS: tl.constexpr,  # rows per program
    BT: tl.constexpr,  # positions per tile
    ONE_TILE: tl.constexpr,  # T <= BT: the keys are loaded once and kept for the 32 counting passes
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    bb = (rows // S).to(tl.int64)
    n = tl.load(len_ptr + bb * stride_len, mask=row_ok, other=0)
    n = tl.where(row_ok, tl.minimum(n, T), 0)  # [ROWS]
    n_max = tl.max(n, axis=0)  # tiles past every row's length are not visited
    row_ptr = x_ptr + bb * stride_xb + (rows % S).to(tl.int64) * stride_xs
    cols0 = tl.arange(0, BT)
    if ONE_TILE:
        keys0 = _topk_keys(row_ptr, cols0, n, stride_xt)
    else:
        keys0 = tl.zeros([ROWS, BT], dtype=tl.int64)  # unused

    # Bisection for tau, the largest key with count(key >= tau) >= K: the K-th largest visible key. The
    # search runs over [INT32_MIN + 1, INT32_MAX] (no visible key is INT32_MIN, the invisible mark); a row
    # with fewer than K visible entries ends at INT32_MIN + 1 and then takes every visible entry.
    lo = tl.full([ROWS], -2147483647, dtype=tl.int64)
    hi = tl.full([ROWS], 2147483647, dtype=tl.int64)
    for _ in range(0, 32):  # each step at least halves hi - lo + 1, which starts at 2^32 - 1
        mid = lo + ((hi - lo + 1) >> 1)
        if ONE_TILE:
            cnt = tl.sum((keys0 >= mid[:, None]).to(tl.int32), axis=1)
        else:
            cnt = tl.zeros([ROWS], dtype=tl.int32)
            for t0 in range(0, n_max, BT):
                keys = _topk_keys(row_ptr, t0 + cols0, n, stride_xt)
                cnt += tl.sum((keys >= mid[:, None]).to(tl.int32), axis=1)
        ok = cnt >= K
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    tau = lo

    above = tl.zeros([ROWS], dtype=tl.int32)  # entries strictly above tau: all of them are taken
    for t0 in range(0, n_max, BT):
        keys = _topk_keys(row_ptr, t0 + cols0, n, stride_xt)
        above += tl.sum((keys > tau[:, None]).to(tl.int32), axis=1)
    need = K - above  # ties at tau to take, lowest positions first

    # Positions in ascending order: an entry's output slot is the number of taken entries before it.
    taken = tl.zeros([ROWS], dtype=tl.int32)
    ties = tl.zeros([ROWS], dtype=tl.int32)
    out_row = out_ptr + rows.to(tl.int64) * K
    for t0 in range(0, n_max, BT):
        cols = t0 + cols0
        keys = _topk_keys(row_ptr, cols, n, stride_xt)
        tie = (keys == tau[:, None]).to(tl.int32)
        tie_rank = ties[:, None] + tl.cumsum(tie, axis=1) - tie  # ties before this entry
        take = ((keys > tau[:, None]) | ((tie > 0) & (tie_rank < need[:, None]))).to(tl.int32)
        slot = taken[:, None] + tl.cumsum(take, axis=1) - take
        tl.store(out_row[:, None] + slot, cols[None, :], mask=take > 0)
        taken += tl.sum(take, axis=1)
        ties += tl.sum(tie, axis=1)
    for k0 in range(0, K, BT):  # the slots no visible entry filled
        slots = k0 + cols0
        tl.store(out_row[:, None] + slots[None, :], tl.full([ROWS, BT], -1, dtype=tl.int32),
                 mask=row_ok[:, None] & (slots[None, :] >= taken[:, None]) & (slots[None, :] < K))


# --------------------------------------------------------------------------------------------------------
# Sparse absorbed-MLA attention


@triton.jit
def _row_ptrs(
    kv_ptr,  # PAGED: [N, P, C] cache pages; else [Tt, C] packed rows
    bt_row,  # PAGED: this request's block-table row (int32); else unused
    start,  # not PAGED: the sequence's first token (int64); else unused
    pos,  # [BLOCK_K] positions inside the sequence / request
    valid,  # [BLOCK_K] which positions are read (invalid ones point at row 0 of the sequence)
    stride_kn, stride_kp, stride_btm,
    PAGE: tl.constexpr, PAGED: tl.constexpr,
):
    """Pointers at the start of each selected latent row (int64 offsets: a cache can pass 2^31 elements)."""
    safe = tl.where(valid, pos, 0)
    if PAGED:
        page = tl.load(bt_row + (safe // PAGE) * stride_btm, mask=valid, other=0).to(tl.int64)
        return kv_ptr + page * stride_kn + (safe % PAGE).to(tl.int64) * stride_kp
    else:
        return kv_ptr + (start + safe.to(tl.int64)) * stride_kn


@triton.jit
def _sparse_mla_fwd_kernel(
    q_ptr,  # [Q, H, C] queries [q_nope . W_UK, q_pe]; token r at (r // S_per) * stride_qb + (r % S_per) * stride_qs
    kv_ptr,  # PAGED: [N, P, C] cache pages; else [Tt, C] packed latent rows; q's dtype, any strides
    bt_ptr,  # PAGED: [B, M] int32 block table; else unused
    len_ptr,  # PAGED: [B] int32 cache_seqlens; else [B + 1] int32 cu_seqlens
    seq_ptr,  # not PAGED: [Tt] int64 sequence of each token; else unused
    idx_ptr,  # [Q, K] int32 selected positions, addressed like q
    o_ptr,  # SINGLE: [Q, H, V] out in q's dtype, contiguous; else [Q * H, num_splits, V] fp32 partials
    lse_ptr,  # SINGLE: fp32 lse at b * stride_lb + i * stride_li + h * stride_lh; else [Q * H, num_splits] fp32
    S_per,  # query tokens per request (1 for a prefill)
    H, V, C, K,
    num_splits,  # programs along grid axis 2 sharing one query's K selections
    qk_scale,  # softmax_scale * log2(e)
    stride_qb, stride_qs, stride_qh, stride_qc,
    stride_kn, stride_kp, stride_kc,
    stride_btb, stride_btm,
    stride_ib, stride_is, stride_ik,
    stride_lb, stride_li, stride_lh,
    PAGED: tl.constexpr,  # rows come from a paged cache (decode) rather than a packed [Tt, C] tensor
    SINGLE: tl.constexpr,  # num_splits == 1: write the final out / lse
    PAGE: tl.constexpr,  # P (1, unused, when not PAGED)
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_REST: tl.constexpr,  # C > V: the key has columns past the values (k_pe in V3)
    IEEE: tl.constexpr,  # fp32 inputs: full-precision dots
):
    r = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    bb = r // S_per
    ii = r % S_per
    h_ok = heads < H
    if PAGED:
        n = tl.load(len_ptr + bb)
        start = bb  # unused
        bt_row = bt_ptr + bb * stride_btb
    else:
        seq = tl.load(seq_ptr + r)
        start = tl.load(len_ptr + seq).to(tl.int64)
        n = tl.load(len_ptr + seq + 1) - start
        bt_row = bt_ptr  # unused

    q_row = q_ptr + bb * stride_qb + ii * stride_qs + heads.to(tl.int64) * stride_qh  # [BLOCK_H]
    cv = tl.arange(0, BLOCK_V)
    cv_ok = cv < V
    q_v = tl.load(q_row[:, None] + cv[None, :] * stride_qc, mask=h_ok[:, None] & cv_ok[None, :], other=0.0)
    if HAS_REST:
        cr = V + tl.arange(0, BLOCK_R)
        cr_ok = cr < C
        q_r = tl.load(q_row[:, None] + cr[None, :] * stride_qc, mask=h_ok[:, None] & cr_ok[None, :], other=0.0)

    n_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_tiles, num_splits)
    t_begin = split * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)
    idx_row = idx_ptr + bb * stride_ib + ii * stride_is
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max score (base 2)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_H, BLOCK_V], dtype=tl.float32)  # running sum of p * v
    for t in range(t_begin, t_end):
        ks = t * BLOCK_K + tl.arange(0, BLOCK_K)
        pos = tl.load(idx_row + ks * stride_ik, mask=ks < K, other=-1)
        valid = (pos >= 0) & (pos < n)
        rows = _row_ptrs(kv_ptr, bt_row, start, pos, valid, stride_kn, stride_kp, stride_btm, PAGE, PAGED)
        # One gather of the value columns is K (for q.k) and V (for p.v) of every head of the program.
        kv = tl.load(rows[:, None] + cv[None, :] * stride_kc, mask=valid[:, None] & cv_ok[None, :], other=0.0)
        s = _dot(q_v, tl.trans(kv), None, IEEE)  # [BLOCK_H, BLOCK_K] fp32
        if HAS_REST:
            kr = tl.load(rows[:, None] + cr[None, :] * stride_kc, mask=valid[:, None] & cr_ok[None, :], other=0.0)
            s = _dot(q_r, tl.trans(kr), s, IEEE)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen nothing yet has m_new = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _dot(p, kv, acc * alpha[:, None], IEEE)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # a head that saw nothing: acc is 0, so out is 0
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    rh = r * H + heads.to(tl.int64)  # [BLOCK_H] (token, head) row
    if SINGLE:
        tl.store(o_ptr + rh[:, None] * V + cv[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=h_ok[:, None] & cv_ok[None, :])
        tl.store(lse_ptr + bb * stride_lb + ii * stride_li + heads * stride_lh, lse, mask=h_ok)
    else:
        part = rh * num_splits + split
        tl.store(o_ptr + part[:, None] * V + cv[None, :], out, mask=h_ok[:, None] & cv_ok[None, :])
        tl.store(lse_ptr + part, lse, mask=h_ok)


@triton.jit
def _sparse_mla_bwd_kernel(
    q_ptr,  # [Tt, H, C] queries, any strides
    kv_ptr,  # [Tt, C] packed latent rows, any strides
    cu_ptr,  # [B + 1] int32 cu_seqlens
    seq_ptr,  # [Tt] int64 sequence of each token
    idx_ptr,  # [Tt, K] int32 selected positions, any strides
    o_ptr,  # [Tt, H, V] forward output, contiguous
    do_ptr,  # [Tt, H, V] gradient of the output, any strides
    lse_ptr,  # [Tt, H] fp32 forward lse (natural log), contiguous
    dlse_ptr,  # HAS_DLSE: [Tt, H] gradient of the lse, any strides; else unused
    dq_ptr,  # [Tt, H, C] output in q's dtype, contiguous
    dkv_ptr,  # [Tt, C] fp32, zero-initialised, contiguous: receives atomic adds
    H, V, C, K,
    qk_scale,  # softmax_scale * log2(e)
    scale,  # softmax_scale
    stride_qt, stride_qh, stride_qc,
    stride_kt, stride_kc,
    stride_it, stride_ik,
    stride_dot, stride_doh, stride_dov,
    stride_dlt, stride_dlh,
    HAS_DLSE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_REST: tl.constexpr, IEEE: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    seq = tl.load(seq_ptr + r)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    n = tl.load(cu_ptr + seq + 1) - start
    heads64 = heads.to(tl.int64)

    cv = tl.arange(0, BLOCK_V)
    cv_ok = cv < V
    hv_ok = h_ok[:, None] & cv_ok[None, :]
    q_row = q_ptr + r * stride_qt + heads64 * stride_qh
    q_v = tl.load(q_row[:, None] + cv[None, :] * stride_qc, mask=hv_ok, other=0.0)
    if HAS_REST:
        cr = V + tl.arange(0, BLOCK_R)
        cr_ok = cr < C
        q_r = tl.load(q_row[:, None] + cr[None, :] * stride_qc, mask=h_ok[:, None] & cr_ok[None, :], other=0.0)
    do = tl.load(do_ptr + r * stride_dot + heads64[:, None] * stride_doh + cv[None, :] * stride_dov, mask=hv_ok,
                 other=0.0)
    o = tl.load(o_ptr + (r * H + heads64)[:, None] * V + cv[None, :], mask=hv_ok, other=0.0)
    # delta = d(loss)/d(lse) subtracted from rowsum(dO * O): d lse / d s = p, so ds = p * (dp - delta).
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + r * stride_dlt + heads64 * stride_dlh, mask=h_ok, other=0.0).to(tl.float32)
    lse2 = tl.load(lse_ptr + r * H + heads64, mask=h_ok, other=0.0) * 1.4426950408889634  # base 2

    dq_v = tl.zeros([BLOCK_H, BLOCK_V], dtype=tl.float32)
    if HAS_REST:
        dq_r = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    idx_row = idx_ptr + r * stride_it
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        pos = tl.load(idx_row + ks * stride_ik, mask=ks < K, other=-1)
        valid = (pos >= 0) & (pos < n)
        rows = _row_ptrs(kv_ptr, kv_ptr, start, pos, valid, stride_kt, 0, 0, 1, False)
        kv = tl.load(rows[:, None] + cv[None, :] * stride_kc, mask=valid[:, None] & cv_ok[None, :], other=0.0)
        s = _dot(q_v, tl.trans(kv), None, IEEE)
        if HAS_REST:
            kr = tl.load(rows[:, None] + cr[None, :] * stride_kc, mask=valid[:, None] & cr_ok[None, :], other=0.0)
            s = _dot(q_r, tl.trans(kr), s, IEEE)
        # Padded heads and invalid selections get p = 0 (and so ds = 0): they add nothing anywhere.
        p = tl.where(h_ok[:, None] & valid[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)  # [BLOCK_H, BLOCK_K]
        dp = _dot(do, tl.trans(kv), None, IEEE)
        ds = p * (dp - delta[:, None])  # gradient of the scaled score (scale applied below)
        dq_v = _dot(ds, kv, dq_v, IEEE)
        dkv_v = _dot(tl.trans(ds), q_v, None, IEEE) * scale + _dot(tl.trans(p), do, None, IEEE)  # [BLOCK_K, BLOCK_V]
        dkv_row = dkv_ptr + (start + tl.where(valid, pos, 0).to(tl.int64)) * C  # [BLOCK_K]
        tl.atomic_add(dkv_row[:, None] + cv[None, :], dkv_v, mask=valid[:, None] & cv_ok[None, :])
        if HAS_REST:
            dq_r = _dot(ds, kr, dq_r, IEEE)
            dkv_r = _dot(tl.trans(ds), q_r, None, IEEE) * scale
            tl.atomic_add(dkv_row[:, None] + cr[None, :], dkv_r, mask=valid[:, None] & cr_ok[None, :])

    dq_row = dq_ptr + (r * H + heads64) * C
    tl.store(dq_row[:, None] + cv[None, :], (dq_v * scale).to(dq_ptr.dtype.element_ty), mask=hv_ok)
    if HAS_REST:
        tl.store(dq_row[:, None] + cr[None, :], (dq_r * scale).to(dq_ptr.dtype.element_ty),
                 mask=h_ok[:, None] & cr_ok[None, :])


# --------------------------------------------------------------------------------------------------------
# Indexer KL loss


@triton.jit
def _kl_fwd_kernel(
    x_ptr,  # [B, S, T] index scores, any strides (read as fp32)
    t_ptr,  # [B, S, T] target (head-summed attention probabilities), any strides (read as fp32)
    loss_ptr,  # [B * S] fp32 per-row KL
    lse_ptr,  # [B * S] fp32 logsumexp of each row's scores (natural log)
    z_ptr,  # [B * S] fp32 sum of each row's target
    R, S, T,
    stride_xb, stride_xs, stride_xt,
    stride_tb, stride_ts, stride_tt,
    ROWS: tl.constexpr, BT: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    bb = (rows // S).to(tl.int64)
    ss = (rows % S).to(tl.int64)
    x_row = x_ptr + bb * stride_xb + ss * stride_xs
    t_row = t_ptr + bb * stride_tb + ss * stride_ts
    m = tl.full([ROWS], float("-inf"), dtype=tl.float32)  # running max of the scores
    l = tl.zeros([ROWS], dtype=tl.float32)  # running sum of exp(x - m)
    z = tl.zeros([ROWS], dtype=tl.float32)  # sum of target
    a = tl.zeros([ROWS], dtype=tl.float32)  # sum of target * log(target) over target > 0
    xs = tl.zeros([ROWS], dtype=tl.float32)  # sum of target * score over target > 0
    for t0 in range(0, T, BT):
        cols = t0 + tl.arange(0, BT)
        mask = row_ok[:, None] & (cols < T)[None, :]
        x = tl.load(x_row[:, None] + cols[None, :] * stride_xt, mask=mask, other=float("-inf")).to(tl.float32)
        tg = tl.load(t_row[:, None] + cols[None, :] * stride_tt, mask=mask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing finite yet: keep exp at 0, not NaN
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
        pos = tg > 0.0
        z += tl.sum(tg, axis=1)
        a += tl.sum(tl.where(pos, tg * tl.log(tl.where(pos, tg, 1.0)), 0.0), axis=1)
        xs += tl.sum(tl.where(pos, tg * tl.where(pos, x, 0.0), 0.0), axis=1)  # no 0 * -inf formed
    lse = tl.where(l > 0.0, m + tl.log(tl.where(l > 0.0, l, 1.0)), float("-inf"))
    has = z > 0.0
    zs = tl.where(has, z, 1.0)
    # With p = target / Z: sum p log p = A / Z - log Z and sum p log softmax(x) = X / Z - lse.
    loss = tl.where(has, a / zs - tl.log(zs) - xs / zs + lse, 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(z_ptr + rows, z, mask=row_ok)


@triton.jit
def _kl_bwd_kernel(
    x_ptr, t_ptr,  # as in the forward
    lse_ptr, z_ptr,  # [B * S] fp32 from the forward
    g_ptr,  # 0-d fp32 gradient of the loss (read on the device: no host sync)
    dx_ptr,  # [B, S, T] output in the scores' dtype, contiguous
    R, S, T,
    inv_rows,  # 1 / (B * S): the loss is a mean over queries
    stride_xb, stride_xs, stride_xt,
    stride_tb, stride_ts, stride_tt,
    ROWS: tl.constexpr, BT: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BT + tl.arange(0, BT)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < T)[None, :]
    bb = (rows // S).to(tl.int64)
    ss = (rows % S).to(tl.int64)
    x = tl.load(x_ptr + (bb * stride_xb + ss * stride_xs)[:, None] + cols[None, :] * stride_xt, mask=mask,
                other=float("-inf")).to(tl.float32)
    tg = tl.load(t_ptr + (bb * stride_tb + ss * stride_ts)[:, None] + cols[None, :] * stride_tt, mask=mask,
                 other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("-inf"))
    z = tl.load(z_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr) * inv_rows
    # d/dx of sum p (log p - x + lse) is softmax(x) * sum(p) - p; a row without target has sum(p) = 0.
    live = (z > 0.0) & (lse > float("-inf"))
    sm = tl.where(live[:, None], tl.exp(x - tl.where(live, lse, 0.0)[:, None]), 0.0)
    p = tg / tl.where(z > 0.0, z, 1.0)[:, None]
    dx = g * (sm - p)
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * T + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Launchers


def _pow2(n: int, floor: int = 16) -> int:
    """A power of two >= max(n, floor): tl.arange needs powers of two and tl.dot dims of at least 16."""
    return max(floor, triton.next_power_of_2(max(n, 1)))


def _fail(fn: str, msg: str, exc=ValueError):
    raise exc(f"r1kernels.triton.sparse_dsa.{fn}: {msg}")


def _indexer_blocks(s: int, t: int, di: int, device: torch.device) -> dict:
    if device.type == "cuda":
        bs, bt, opts = 64, 64, dict(num_warps=4, num_stages=2)
    else:  # the interpreter: few, large programs
        bs, bt, opts = 64, 128, {}
    return dict(BS=min(bs, _pow2(s)), BT=min(bt, _pow2(t)), BD=_pow2(di), opts=opts)


def _check_indexer(fn: str, q_idx, k_idx, weights, q_positions) -> None:
    if q_idx.dim() != 4 or k_idx.dim() != 3 or weights.dim() != 3 or q_positions.dim() != 2:
        _fail(fn, f"expected q_idx [B, S, Hi, Di], k_idx [B, T, Di], weights [B, S, Hi], q_positions [B, S]; got "
                  f"{tuple(q_idx.shape)}, {tuple(k_idx.shape)}, {tuple(weights.shape)}, {tuple(q_positions.shape)}")
    b, s, hi, di = q_idx.shape
    if k_idx.shape[0] != b or k_idx.shape[2] != di or tuple(weights.shape) != (b, s, hi) or \
            tuple(q_positions.shape) != (b, s):
        _fail(fn, f"shapes disagree: q_idx {tuple(q_idx.shape)}, k_idx {tuple(k_idx.shape)}, weights "
                  f"{tuple(weights.shape)}, q_positions {tuple(q_positions.shape)}")
    if q_idx.dtype not in _FLOATS or k_idx.dtype != q_idx.dtype or weights.dtype not in _FLOATS:
        _fail(fn, f"q_idx and k_idx must share one float dtype and weights be float; got {q_idx.dtype}, "
                  f"{k_idx.dtype}, {weights.dtype}", TypeError)
    if q_positions.dtype != torch.int64:
        _fail(fn, f"q_positions must be int64, got {q_positions.dtype}", TypeError)
    if di > MAX_INDEX_DIM:
        _fail(fn, f"Di = {di} exceeds the {MAX_INDEX_DIM} columns a tile holds")


def _indexer_args(q_idx, k_idx, weights, q_positions):
    return (q_idx.stride(0), q_idx.stride(1), q_idx.stride(2), q_idx.stride(3),
            k_idx.stride(0), k_idx.stride(1), k_idx.stride(2),
            weights.stride(0), weights.stride(1), weights.stride(2),
            q_positions.stride(0), q_positions.stride(1))


def lightning_indexer_fwd(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor,
                          q_positions: torch.Tensor) -> torch.Tensor:
    """Index scores ``[B, S, T]`` fp32 (contiguous); q_idx ``[B, S, Hi, Di]``, k_idx ``[B, T, Di]`` (q's dtype),
    weights ``[B, S, Hi]`` (any float), q_positions ``[B, S]`` int64; any strides."""
    _check_indexer("lightning_indexer_fwd", q_idx, k_idx, weights, q_positions)
    b, s, hi, di = q_idx.shape
    t = k_idx.shape[1]
    out = torch.empty(b, s, t, dtype=torch.float32, device=q_idx.device)
    if out.numel() == 0:
        return out
    if hi == 0 or di == 0:  # an empty sum: 0 where visible
        vis = torch.arange(t, device=q_idx.device)[None, None, :] <= q_positions[:, :, None]
        return out.copy_(torch.where(vis, 0.0, float("-inf")))
    cfg = _indexer_blocks(s, t, di, q_idx.device)
    grid = (triton.cdiv(t, cfg["BT"]), triton.cdiv(s, cfg["BS"]), b)
    _indexer_fwd_kernel[grid](
        q_idx, k_idx, weights, q_positions, out, s, t, hi, di,
        *_indexer_args(q_idx, k_idx, weights, q_positions),
        BS=cfg["BS"], BT=cfg["BT"], BD=cfg["BD"], IEEE=q_idx.dtype == torch.float32, **cfg["opts"],
    )
    return out


def lightning_indexer_bwd(g: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor,
                          q_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq [B, S, Hi, Di], dk [B, T, Di], dw [B, S, Hi])`` in their inputs' dtypes from the scores' gradient
    ``g [B, S, T]`` (any strides; entries at masked positions are ignored)."""
    _check_indexer("lightning_indexer_bwd", q_idx, k_idx, weights, q_positions)
    b, s, hi, di = q_idx.shape
    t = k_idx.shape[1]
    if tuple(g.shape) != (b, s, t) or g.device != q_idx.device:
        _fail("lightning_indexer_bwd",
              f"g must be [{b}, {s}, {t}] on {q_idx.device}, got {tuple(g.shape)} on {g.device}")
    dq = torch.zeros(b, s, hi, di, dtype=q_idx.dtype, device=q_idx.device)
    dk = torch.zeros(b, t, di, dtype=k_idx.dtype, device=q_idx.device)
    dw = torch.zeros(b, s, hi, dtype=weights.dtype, device=q_idx.device)
    if b * s * t * hi * di == 0:
        return dq, dk, dw
    cfg = _indexer_blocks(s, t, di, q_idx.device)
    common = (s, t, hi, di, *_indexer_args(q_idx, k_idx, weights, q_positions), g.stride(0), g.stride(1), g.stride(2))
    meta = dict(BS=cfg["BS"], BT=cfg["BT"], BD=cfg["BD"], IEEE=q_idx.dtype == torch.float32, **cfg["opts"])
    ins = (q_idx, k_idx, weights, q_positions, g)
    _indexer_bwd_dq_kernel[(triton.cdiv(s, cfg["BS"]), b)](*ins, dq, dw, *common, **meta)
    _indexer_bwd_dk_kernel[(triton.cdiv(t, cfg["BT"]), b)](*ins, dk, *common, **meta)
    return dq, dk, dw


def dsa_topk(scores: torch.Tensor, k: int, lengths: torch.Tensor) -> torch.Tensor:
    """Sort-free top-k: ``[B, S, K]`` int32 selected positions in ascending order, -1 padded (semantics:
    ``r1kernels.reference.sparse_dsa.dsa_topk``). scores ``[B, S, T]`` any float dtype and strides,
    lengths ``[B]`` int32."""
    if scores.dim() != 3 or scores.dtype not in _FLOATS:
        _fail("dsa_topk", f"scores must be a float [B, S, T] tensor, got {scores.dtype} {tuple(scores.shape)}")
    b, s, t = scores.shape
    if tuple(lengths.shape) != (b,) or lengths.dtype != torch.int32:
        _fail("dsa_topk", f"lengths must be int32 [{b}], got {lengths.dtype} {tuple(lengths.shape)}")
    k = int(k)
    if k < 1:
        _fail("dsa_topk", f"k must be >= 1, got {k}")
    out = torch.empty(b, s, k, dtype=torch.int32, device=scores.device)
    rows = b * s
    if rows == 0:
        return out
    if t == 0:
        return out.fill_(-1)
    if scores.is_cuda:
        bt = min(_pow2(t), 4096)
        # A program holds ROWS x BT int64 keys; about 8K of them keep 8 warps out of spills.
        rows_pp, opts = max(1, min(16, 8192 // bt)), dict(num_warps=8 if bt >= 1024 else 4)
    else:
        bt = min(_pow2(t), 1024)
        rows_pp, opts = min(_pow2(rows, 1), 16), {}
    _topk_kernel[(triton.cdiv(rows, rows_pp),)](
        scores, lengths, out, rows, s, t, k,
        scores.stride(0), scores.stride(1), scores.stride(2), lengths.stride(0),
        ROWS=rows_pp, BT=bt, ONE_TILE=t <= bt, **opts,
    )
    return out


def _attn_blocks(h: int, v: int, rest: int, k: int, device: torch.device, elem_bytes: int, backward: bool) -> dict:
    wide = v + rest > 256
    if device.type == "cuda":
        # With 512-wide values the fp32 accumulator [BLOCK_H, 512] and the queries [BLOCK_H, 576] live in
        # registers: 16 heads per program keeps 4 warps from spilling (as in mla_decode); the backward holds
        # dq and a [BLOCK_K, 512] dkv tile besides, so it takes 8 warps and narrower key tiles.
        block_h = min(_pow2(h), 16 if wide else 64)
        block_k = (16 if wide else 32) if backward else (32 if wide else 64)
        opts = dict(num_warps=8 if backward else 4, num_stages=1 if (wide and elem_bytes > 2) or backward else 2)
    else:
        block_h, block_k, opts = min(_pow2(h), 64), 64, {}
    return dict(block_h=block_h, block_k=min(block_k, _pow2(k)), opts=opts)


def _check_attn(fn: str, q: torch.Tensor, kv: torch.Tensor, v: int) -> None:
    if q.dtype not in _FLOATS or kv.dtype != q.dtype:
        _fail(fn, f"q and the latent rows must share one float dtype; got {q.dtype} and {kv.dtype}", TypeError)
    c = q.shape[-1]
    if kv.shape[-1] != c:
        _fail(fn, f"latent rows are {kv.shape[-1]} wide but q is {c} wide")
    if not 0 < v <= c:
        _fail(fn, f"head_dim_v={v} must be in (0, C={c}]")
    if c > MAX_ROW:
        _fail(fn, f"C = {c} exceeds the {MAX_ROW} columns a tile holds")


def _token_sequences(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """``[Tt]`` int64: the sequence each packed token belongs to (empty sequences own none); on the device."""
    tok = torch.arange(tokens, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens, tok, right=True) - 1


def dsa_mla_prefill_fwd(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, cu_seqlens: torch.Tensor,
                        softmax_scale: float, head_dim_v: int,
                        seq: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse packed prefill forward: ``(out [Tt, H, V] in q's dtype, lse [Tt, H] fp32, seq [Tt] int64)``.

    q ``[Tt, H, C]``, kv ``[Tt, C]`` (q's dtype), idx ``[Tt, K]`` int32 positions inside each token's
    sequence, cu_seqlens ``[B + 1]`` int32; any strides. ``seq`` (each token's sequence) is returned for
    the backward, which needs it too.
    """
    if q.dim() != 3 or kv.dim() != 2 or idx.dim() != 2 or idx.shape[0] != q.shape[0] or kv.shape[0] != q.shape[0]:
        _fail("dsa_mla_prefill_fwd", f"expected q [Tt, H, C], kv [Tt, C], idx [Tt, K]; got {tuple(q.shape)}, "
                                     f"{tuple(kv.shape)}, {tuple(idx.shape)}")
    v = int(head_dim_v)
    _check_attn("dsa_mla_prefill_fwd", q, kv, v)
    tt, h, c = q.shape
    kk = idx.shape[1]
    out = torch.empty(tt, h, v, dtype=q.dtype, device=q.device)
    lse = torch.empty(tt, h, dtype=torch.float32, device=q.device)
    seq = _token_sequences(cu_seqlens, tt) if seq is None else seq
    if tt * h == 0:
        return out, lse, seq
    if kk == 0:
        return out.zero_(), lse.fill_(float("-inf")), seq
    cfg = _attn_blocks(h, v, c - v, kk, q.device, q.element_size(), False)
    grid = (tt, triton.cdiv(h, cfg["block_h"]), 1)
    _sparse_mla_fwd_kernel[grid](
        q, kv, kv, cu_seqlens, seq, idx, out, lse,
        1, h, v, c, kk, 1, float(softmax_scale) * _LOG2E,
        q.stride(0), 0, q.stride(1), q.stride(2),
        kv.stride(0), 0, kv.stride(1),
        0, 0,
        idx.stride(0), 0, idx.stride(1),
        h, 0, 1,
        PAGED=False, SINGLE=True, PAGE=1,
        BLOCK_H=cfg["block_h"], BLOCK_K=cfg["block_k"], BLOCK_V=_pow2(v), BLOCK_R=_pow2(c - v), HAS_REST=c > v,
        IEEE=q.dtype == torch.float32, **cfg["opts"],
    )
    return out, lse, seq


def dsa_mla_prefill_bwd(dout: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor,
                        cu_seqlens: torch.Tensor, seq: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        softmax_scale: float, dlse: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dq [Tt, H, C] in q's dtype, dkv [Tt, C] in kv's dtype)`` from the forward's out (contiguous) and lse.

    dkv is accumulated in fp32 with atomic adds (a row selected by many queries gets one add per query and
    head block), then cast once.
    """
    tt, h, c = q.shape
    v = out.shape[-1]
    kk = idx.shape[1]
    if tuple(dout.shape) != (tt, h, v) or (dlse is not None and tuple(dlse.shape) != (tt, h)):
        _fail("dsa_mla_prefill_bwd", f"dout must be [{tt}, {h}, {v}] and dlse [{tt}, {h}]; got {tuple(dout.shape)}, "
                                     f"{None if dlse is None else tuple(dlse.shape)}")
    dq = torch.zeros(tt, h, c, dtype=q.dtype, device=q.device)
    dkv = torch.zeros(tt, c, dtype=torch.float32, device=q.device)
    if tt * h * kk == 0:
        return dq, dkv.to(kv.dtype)
    out = out.contiguous()
    lse = lse.contiguous()
    cfg = _attn_blocks(h, v, c - v, kk, q.device, q.element_size(), True)
    has_dlse = dlse is not None
    dl = dlse if has_dlse else lse
    _sparse_mla_bwd_kernel[(tt, triton.cdiv(h, cfg["block_h"]))](
        q, kv, cu_seqlens, seq, idx, out, dout, lse, dl, dq, dkv,
        h, v, c, kk, float(softmax_scale) * _LOG2E, float(softmax_scale),
        q.stride(0), q.stride(1), q.stride(2),
        kv.stride(0), kv.stride(1),
        idx.stride(0), idx.stride(1),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dl.stride(0), dl.stride(1),
        HAS_DLSE=has_dlse,
        BLOCK_H=cfg["block_h"], BLOCK_K=cfg["block_k"], BLOCK_V=_pow2(v), BLOCK_R=_pow2(c - v), HAS_REST=c > v,
        IEEE=q.dtype == torch.float32, **cfg["opts"],
    )
    return dq, dkv.to(kv.dtype)


def dsa_mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                   idx: torch.Tensor, softmax_scale: float, head_dim_v: int, *,
                   num_splits: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse paged decode: ``(out [B, S, H, V] in q's dtype, lse [B, H, S] fp32)``.

    q ``[B, S, H, C]``, kv_cache ``[N, P, C]`` (q's dtype), block_table ``[B, M]`` int32, cache_seqlens ``[B]``
    int32, idx ``[B, S, K]`` int32 absolute positions; any strides. ``num_splits`` overrides the number of
    programs sharing one query's K selections (chosen from the shapes; tests use it to cover the merge).
    """
    if q.dim() != 4 or kv_cache.dim() != 3 or idx.dim() != 3 or tuple(idx.shape[:2]) != tuple(q.shape[:2]):
        _fail("dsa_mla_decode", f"expected q [B, S, H, C], kv_cache [N, P, C], idx [B, S, K]; got {tuple(q.shape)}, "
                                f"{tuple(kv_cache.shape)}, {tuple(idx.shape)}")
    v = int(head_dim_v)
    _check_attn("dsa_mla_decode", q, kv_cache, v)
    bsz, s, h, c = q.shape
    kk = idx.shape[2]
    out = torch.empty(bsz, s, h, v, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, h, s, dtype=torch.float32, device=q.device)
    if bsz * s * h == 0:
        return out, lse
    if kk == 0 or kv_cache.numel() == 0 or block_table.shape[1] == 0:
        return out.zero_(), lse.fill_(float("-inf"))  # no row can be read: nothing is seen
    cfg = _attn_blocks(h, v, c - v, kk, q.device, q.element_size(), False)
    block_h = cfg["block_h"]
    head_blocks = triton.cdiv(h, block_h)
    tiles = triton.cdiv(kk, cfg["block_k"])
    if num_splits is None:
        # Decode batches are small: split the K selections so that about two waves of programs cover the GPU
        # (the interpreter prefers one program per query).
        target = 2 * persistent_programs(q.device) if q.is_cuda else 1
        num_splits = max(1, min(triton.cdiv(target, bsz * s * head_blocks), tiles, 64))
    splits = int(num_splits)
    if splits < 1:
        _fail("dsa_mla_decode", f"num_splits must be >= 1, got {splits}")
    single = splits == 1
    if single:
        o_buf, lse_buf = out, lse
    else:
        o_buf = torch.empty(bsz * s * h, splits, v, dtype=torch.float32, device=q.device)
        lse_buf = torch.empty(bsz * s * h, splits, dtype=torch.float32, device=q.device)
    _sparse_mla_fwd_kernel[(bsz * s, head_blocks, splits)](
        q, kv_cache, block_table, cache_seqlens, cache_seqlens, idx, o_buf, lse_buf,
        s, h, v, c, kk, splits, float(softmax_scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_table.stride(0), block_table.stride(1),
        idx.stride(0), idx.stride(1), idx.stride(2),
        h * s, 1, s,
        PAGED=True, SINGLE=single, PAGE=kv_cache.shape[1],
        BLOCK_H=block_h, BLOCK_K=cfg["block_k"], BLOCK_V=_pow2(v), BLOCK_R=_pow2(c - v), HAS_REST=c > v,
        IEEE=q.dtype == torch.float32, **cfg["opts"],
    )
    if not single:
        rows = s * h
        merge_v = min(_pow2(v), 128) if q.is_cuda else _pow2(v)
        merge_h = min(_pow2(rows), 16 if q.is_cuda else 64)
        # mla_decode's merge: partials [B, S*H, splits, V] with row i * H + h, exactly the layout above.
        _decode_merge_kernel[(bsz, triton.cdiv(rows, merge_h), triton.cdiv(v, merge_v))](
            o_buf, lse_buf, out, lse, s, h, v, splits,
            BLOCK_H=merge_h, BLOCK_V=merge_v, **({"num_warps": 4} if q.is_cuda else {}),
        )
    return out, lse


def _kl_blocks(t: int, device: torch.device) -> tuple[int, int]:
    bt = min(_pow2(t, 1), 1024 if device.type == "cuda" else 4096)
    rows = max(1, (4096 if device.type == "cuda" else 65536) // bt)
    return min(rows, 64), bt


def indexer_kl_fwd(scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss fp32 0-d, lse [B*S] fp32, z [B*S] fp32)``: the mean over queries of KL(target / z ||
    softmax(scores)); scores and target ``[B, S, T]``, any float dtypes and strides."""
    if scores.dim() != 3 or tuple(target.shape) != tuple(scores.shape):
        _fail("indexer_kl_fwd",
              f"scores and target must both be [B, S, T]; got {tuple(scores.shape)}, {tuple(target.shape)}")
    b, s, t = scores.shape
    rows = b * s
    loss_rows = torch.zeros(rows, dtype=torch.float32, device=scores.device)
    lse = torch.full((rows,), float("-inf"), dtype=torch.float32, device=scores.device)
    z = torch.zeros(rows, dtype=torch.float32, device=scores.device)
    if rows > 0 and t > 0:
        rows_pp, bt = _kl_blocks(t, scores.device)
        _kl_fwd_kernel[(triton.cdiv(rows, rows_pp),)](
            scores, target, loss_rows, lse, z, rows, s, t,
            scores.stride(0), scores.stride(1), scores.stride(2),
            target.stride(0), target.stride(1), target.stride(2),
            ROWS=rows_pp, BT=bt, **({"num_warps": 4} if scores.is_cuda else {}),
        )
    return loss_rows.sum() / max(rows, 1), lse, z


def indexer_kl_bwd(g: torch.Tensor, scores: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                   z: torch.Tensor) -> torch.Tensor:
    """``d loss / d scores`` ``[B, S, T]`` in scores' dtype; g the loss's 0-d gradient (read on the device)."""
    b, s, t = scores.shape
    rows = b * s
    dx = torch.empty(b, s, t, dtype=scores.dtype, device=scores.device)
    if dx.numel() == 0:
        return dx
    rows_pp, bt = _kl_blocks(t, scores.device)
    _kl_bwd_kernel[(triton.cdiv(rows, rows_pp), triton.cdiv(t, bt))](
        scores, target, lse, z, g.reshape(()).to(torch.float32), dx, rows, s, t, 1.0 / rows,
        scores.stride(0), scores.stride(1), scores.stride(2),
        target.stride(0), target.stride(1), target.stride(2),
        ROWS=rows_pp, BT=bt, **({"num_warps": 4} if scores.is_cuda else {}),
    )
    return dx
