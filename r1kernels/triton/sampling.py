"""Sort-free sampling and speculative verification in Triton.

Letters: R rows of logits (B for ``sample``; B * (N + 1) for the verify filter pass), V vocabulary, B batch
rows, N drafted tokens, j a position, i a token id, C the candidate capacity (= BLOCK_V).

The filtered set of a row is an upper set of its logits: every filter keeps the tokens whose logit is at or
above a threshold (top-k: the k-th largest logit; top-p: the smallest logit whose strictly-greater mass is
below top_p; min-p: exp((x - max) / t) >= min_p, tested per token). So a row needs two thresholds, found
without sorting by a search over the values of the row:

* Keys. A logit x (fp32) maps to the int32 ``key(x)``, monotone in x (-0.0 and +0.0 share key 0). Tokens
  are ordered by logit: two distinct logits whose probabilities round to one fp32 value count as tied in
  the reference and as ordered here, which changes the kept set only when the top-p crossing falls exactly
  between them (and a top_p / min_p within fp32 rounding of a boundary may fall either way). A token whose
  u underflows to 0 is never kept; where that happens (denormals or not) is the hardware's.
* Search. For a weight w (1 for top-k, the unnormalised probability u = exp2((x - max) log2(e) / t) for
  top-p) and a target P, the threshold is the smallest data key v with W(> v) < P (W = summed weight). The
  search keeps a bracket (lo, hi]: every data key <= lo has W(> key) >= P, hi is a data key with
  W(> hi) < P. A pass over the row with a pivot lo + 2 <= p <= hi returns S = W(>= p), the smallest data key
  a >= p and the largest data key b < p; since no data lies in (b, a), S = W(> b) decides b, and the bracket
  becomes (lo, b] (S < P) or (a - 1, hi] (S >= P). It ends when hi = lo + 1: the exact threshold, whatever
  the ties (they share a key). Pivots interpolate W between the bracket ends in value space (log W when both
  ends have mass), with a bisection of the key range after any step that did not halve it: at most 67
  passes (the key range is 2^32 wide and every second step halves it), typically 5-15.
* Candidates. When the tokens that are still undecided fit in C (top-k: all keys > lo; top-p: keys in
  (lo, hi]) they are copied once, in id order, to a per-row scratch [C] (value, id); every later pass of the
  search, and the draw when nothing above the copy is kept, reads that scratch instead of the row. The first
  pivot of a long row is mean + z * std of its logits (z puts about C / 2 tokens above it), which for LLM-like
  rows makes that copy happen after one search pass.
* Draw. One pass (over the candidates when they hold the kept set): the exponential race
  argmax_i u_i / E_i over kept tokens, E_i = -ln U_i with U_i from Philox4x32-10 keyed by the row's seed and
  counted by (token id, position, stream, salt), which is exactly what ``r1kernels.reference.sampling``
  computes. Chunks without a kept token skip the random numbers.

Passes over the logits per row (each reads V s bytes, s = bytes per logit), measured at V = 129,280 with
C = 4096 (``sample(..., return_passes=True)``):

* LLM-like rows (a few tokens kept) with top-p, top-k or both, min-p or not: 3 (statistics, one search pass,
  the candidate copy); the other 5-15 search passes and the draw read <= 8 C = 32 KB of scratch. A bf16 row
  reads ~3 x 259 KB.
* flat rows whose top-p set holds most of the vocabulary (N(0, 1) logits, top-p 0.9): 7-16, then the draw.
* temperature only, or min-p only: 2 (statistics; the draw, with a random number per token).

Long rows (V > C) run one per program in chunks of C, accumulating lane-wise and reducing once per pass;
short rows are packed BLOCK_B to a program, one chunk each. Nothing is sorted, nothing syncs with the host.
"""
from __future__ import annotations

import statistics
from typing import Optional

import torch
import triton
import triton.language as tl

from . import num_warps_for, tile_budget

# Constants read inside kernels must be tl.constexpr (triton rejects other globals).
KEY_NEG_INF = tl.constexpr(-2139095041)  # key(-inf): bits 0xFF800000 ^ 0x7FFFFFFF as int32
INT32_MAX = tl.constexpr(2147483647)
INT32_MIN = tl.constexpr(-2147483648)
LOG2E = tl.constexpr(1.4426950408889634)
STREAM_TOKEN = tl.constexpr(0)  # random stream of the race that draws a token (as in the reference)
STREAM_ACCEPT = tl.constexpr(1)  # random stream of the speculative acceptance test
MODE_DRAW, MODE_STATS, MODE_MASK = 0, 1, 2  # the kernel's MODE: draw tokens, verify statistics, kept mask
# Row chunk (and candidate capacity) on the GPU: a [1, 4096] tile is 8 values per thread at 16 warps.
GPU_BLOCK_V = 4096
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# Element helpers


@triton.jit
def _key(x):
    """fp32 -> int32 key, monotone: flip the magnitude bits of negatives; -0.0 joins +0.0 (key 0)."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(key == -1, 0, key)


@triton.jit
def _val(key):
    """The fp32 value of an int32 key (inverse of _key)."""
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _philox_word0(c0, c1, c2, c3, k0, k1):
    """Word 0 of Philox4x32-10 of counters (c0..c3) under key (k0, k1), all uint32 (broadcast). The rounds of
    Random123 and tl.randint4x, written out so that the stream does not depend on the triton version."""
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0


@triton.jit
def _exp_noise(ids, position, stream, salt, k0, k1):
    """E = -ln U > 0, U = (2 (r >> 9) + 1) / 2^24 (exact in fp32) from the Philox word of each token id.

    ids: int32 [BLOCK_B, BLOCK_V]; position, salt, k0, k1: [BLOCK_B] (uint32-compatible); stream: a constant.
    """
    c0 = ids.to(tl.uint32)
    zero = c0 * 0
    c1 = zero + position[:, None].to(tl.uint32)
    c2 = zero + stream
    c3 = zero + salt[:, None].to(tl.uint32)
    r = _philox_word0(c0, c1, c2, c3, zero + k0[:, None], zero + k1[:, None])
    u = ((r >> 9).to(tl.float32) * 2.0 + 1.0) * (1.0 / 16777216.0)
    return -tl.log(u)


@triton.jit
def _race_step(w, e, ids, best, best_id):
    """One chunk of the exponential race over weights w [BLOCK_B, BLOCK_V] (> 0 = may be drawn) with noise
    e, lane-wise: each lane keeps its best score w / e and that token's id ([BLOCK_B, BLOCK_V]); chunks come
    in increasing id order, so a lane's later token needs a strictly larger score."""
    score = tl.where(w > 0, w / e, -1.0)
    better = score > best
    return tl.where(better, score, best), tl.where(better, ids, best_id)


@triton.jit
def _race_update(w, ids, position, stream, salt, k0, k1, best, best_id):
    """_race_step with the chunk's noise, skipped (no random numbers) when no row has weight in the chunk."""
    if tl.max(tl.max(w, axis=1), axis=0) > 0:
        e = _exp_noise(ids, position, stream, salt, k0, k1)
        best, best_id = _race_step(w, e, ids, best, best_id)
    return best, best_id


@triton.jit
def _race_winner(best, best_id):
    """The race's token per row from the lanes: the largest score, the lowest id on a tie; -1 if no lane
    saw a weight."""
    top = tl.max(best, axis=1)
    win = tl.min(tl.where(best == top[:, None], best_id, INT32_MAX), axis=1)
    return tl.where(top > 0, win, -1)


@triton.jit
def _load_chunk(src_ptr, ids_ptr, row_off, stride_v, n, start, rmask,
                COMPACT: tl.constexpr, BLOCK_V: tl.constexpr):
    """Chunk [start, start + BLOCK_V) of each row of a source: (x fp32, token ids int32, valid), all
    [BLOCK_B, BLOCK_V]; invalid lanes read -inf.

    COMPACT: the candidate scratch (fp32 values and int32 ids at row_off + column, n [BLOCK_B] per row);
    else the logits (row_off + column * stride_v, ids = columns, n = V for every row).
    """
    cols = start + tl.arange(0, BLOCK_V)
    valid = rmask[:, None] & (cols[None, :] < n[:, None])
    if COMPACT:
        off = row_off[:, None] + cols[None, :]
        x = tl.load(src_ptr + off, mask=valid, other=float("-inf"))
        ids = tl.load(ids_ptr + off, mask=valid, other=0)
    else:
        x = tl.load(src_ptr + row_off[:, None] + cols[None, :].to(tl.int64) * stride_v, mask=valid,
                    other=float("-inf")).to(tl.float32)
        ids = valid.to(tl.int32) * 0 + cols[None, :]
    return x, ids, valid


# ----------------------------------------------------------------------------------------------------
# Threshold search


@triton.jit
def _pivot_pass(src_ptr, ids_ptr, row_off, stride_v, n, n_max, rmask, pivot, lo, m, c2,
                WITH_ABOVE: tl.constexpr, USE_MASS: tl.constexpr, COMPACT: tl.constexpr, BLOCK_B: tl.constexpr,
                BLOCK_V: tl.constexpr):
    """One pass of the search over a source. Per row: S = W(key >= pivot), cnt = #(key >= pivot),
    a = min key >= pivot, b = max key < pivot, and (WITH_ABOVE) W(key > lo).

    W counts tokens, or (USE_MASS) sums u = exp2((x - m) * c2), c2 = log2(e) / t. The chunks accumulate
    lane-wise and each row is reduced once at the end: a reduction across the program costs a barrier.
    """
    cnt_acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.int32)
    a_acc = tl.full([BLOCK_B, BLOCK_V], INT32_MAX, dtype=tl.int32)
    b_acc = tl.full([BLOCK_B, BLOCK_V], INT32_MIN, dtype=tl.int32)
    s_acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)  # USE_MASS only
    above_acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)  # WITH_ABOVE only
    for start in range(0, n_max, BLOCK_V):
        x, ids, valid = _load_chunk(src_ptr, ids_ptr, row_off, stride_v, n, start, rmask, COMPACT, BLOCK_V)
        key = _key(x)
        ge = valid & (key >= pivot[:, None])
        cnt_acc += ge.to(tl.int32)
        a_acc = tl.minimum(a_acc, tl.where(ge, key, INT32_MAX))
        b_acc = tl.maximum(b_acc, tl.where(valid & ~ge, key, INT32_MIN))
        if USE_MASS:
            w = tl.where(valid, tl.exp2((x - m[:, None]) * c2[:, None]), 0.0)
            s_acc += tl.where(ge, w, 0.0)
            if WITH_ABOVE:
                above_acc += tl.where(key > lo[:, None], w, 0.0)
    cnt = tl.sum(cnt_acc, axis=1)
    if USE_MASS:
        s = tl.sum(s_acc, axis=1)
    else:
        s = cnt.to(tl.float32)
    return s, cnt, tl.min(a_acc, axis=1), tl.max(b_acc, axis=1), tl.sum(above_acc, axis=1)


@triton.jit
def _any_pass(x_ptr, row_off, stride_v, V, cv_ptr, ci_ptr, crow_off, n_c, comp, c_top, w_top, rmask, pivot, lo,
              m, c2, WITH_ABOVE: tl.constexpr, USE_MASS: tl.constexpr, MULTI: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_V: tl.constexpr):
    """_pivot_pass over the candidates when the row has them (MULTI, one row per program), else over the
    logits. The candidates hold the keys in (lo_c, hi_c]; the c_top tokens of weight w_top above hi_c are
    added back (every pivot and lo of a later pass lie inside (lo_c, hi_c])."""
    n_v = tl.full([BLOCK_B], V, dtype=tl.int32)
    if MULTI:
        if tl.max(comp, axis=0) > 0:
            s, cnt, a, b, w_above = _pivot_pass(cv_ptr, ci_ptr, crow_off, 1, n_c, BLOCK_V, rmask, pivot, lo, m, c2,
                                                WITH_ABOVE, USE_MASS, True, BLOCK_B, BLOCK_V)
            s += w_top
            cnt += c_top
            w_above += w_top
        else:
            s, cnt, a, b, w_above = _pivot_pass(x_ptr, x_ptr, row_off, stride_v, n_v, V, rmask, pivot, lo, m, c2,
                                                WITH_ABOVE, USE_MASS, False, BLOCK_B, BLOCK_V)
    else:
        s, cnt, a, b, w_above = _pivot_pass(x_ptr, x_ptr, row_off, stride_v, n_v, V, rmask, pivot, lo, m, c2,
                                            WITH_ABOVE, USE_MASS, False, BLOCK_B, BLOCK_V)
    return s, cnt, a, b, w_above


@triton.jit
def _compact(x_ptr, row_off, stride_v, V, cv_ptr, ci_ptr, crow_off, rmask, lo, hi, BLOCK_B: tl.constexpr,
             BLOCK_V: tl.constexpr):
    """Copy the tokens with lo < key <= hi, in id order, to the candidate scratch; returns their count per row
    (the caller has checked that it is <= BLOCK_V)."""
    n_v = tl.full([BLOCK_B], V, dtype=tl.int32)
    base = tl.zeros([BLOCK_B], dtype=tl.int32)
    for start in range(0, V, BLOCK_V):
        x, ids, valid = _load_chunk(x_ptr, x_ptr, row_off, stride_v, n_v, start, rmask, False, BLOCK_V)
        key = _key(x)
        sel = valid & (key > lo[:, None]) & (key <= hi[:, None])
        pos = base[:, None] + tl.cumsum(sel.to(tl.int32), axis=1) - 1  # slot of each selected token
        sel = sel & (pos < BLOCK_V)
        tl.store(cv_ptr + crow_off[:, None] + pos, x, mask=sel)
        tl.store(ci_ptr + crow_off[:, None] + pos, ids, mask=sel)
        base += tl.sum(sel.to(tl.int32), axis=1)
    # The program's threads read each other's slots next: make the stores visible to the whole program.
    tl.debug_barrier()
    return base


@triton.jit
def _maybe_compact(active, lo, hi, c_lo, c_hi, w_hi, comp, n_c, c_top, w_top, passes,
                   x_ptr, row_off, stride_v, V, cv_ptr, ci_ptr, crow_off, rmask,
                   USE_MASS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr):
    """Make the candidates once the undecided tokens fit in BLOCK_V (one row per program). The count search
    (top-k) copies every key > lo, which the later top-p and the draw need; the mass search copies the
    bracket (lo, hi] and records what lies above it (c_hi tokens of mass w_hi) to add back."""
    if USE_MASS:
        undecided = c_lo - c_hi
    else:
        undecided = c_lo
    make = active & (comp == 0) & (undecided <= BLOCK_V)
    if tl.max(make.to(tl.int32), axis=0) > 0:
        if USE_MASS:
            hi_c = hi
            c_top = c_hi
            w_top = w_hi
        else:
            hi_c = tl.full([BLOCK_B], INT32_MAX, dtype=tl.int32)
        n_c = _compact(x_ptr, row_off, stride_v, V, cv_ptr, ci_ptr, crow_off, rmask, lo, hi_c, BLOCK_B, BLOCK_V)
        comp = comp + tl.where(make, 1, 0)
        passes += tl.where(make, 1, 0)[:, None]  # one pass over the logits
    return comp, n_c, c_top, w_top, passes


@triton.jit
def _search_update(active, lo, hi, w_lo, w_hi, c_lo, c_hi, bisect, s, cnt, a, b, target):
    """The bracket after a pass: S = W(>= pivot) = W(> b) decides b (good: S < target, or nothing weighs
    above it when target <= 0); good -> (lo, b], or (a - 1, a] when no data lies in (lo, pivot); bad ->
    (a - 1, hi]. Rows not ``active`` keep their state."""
    good = (s < target) | (s <= 0.0)
    b_in = b > lo  # there is data in (lo, pivot)
    moved_lo = ~good | ~b_in
    new_lo = tl.where(moved_lo, a - 1, lo)
    new_hi = tl.where(good, tl.where(b_in, b, a), hi)
    span_old = hi.to(tl.int64) - lo.to(tl.int64)
    span_new = new_hi.to(tl.int64) - new_lo.to(tl.int64)
    w_lo = tl.where(active & moved_lo, s, w_lo)
    c_lo = tl.where(active & moved_lo, cnt, c_lo)
    w_hi = tl.where(active & good & b_in, s, w_hi)
    c_hi = tl.where(active & good & b_in, cnt, c_hi)
    lo = tl.where(active, new_lo, lo)
    hi = tl.where(active, new_hi, hi)
    bisect = (2 * span_new > span_old) & ~bisect  # a slow step: bisect next (never twice in a row)
    active = active & (hi > lo + 1)
    return active, lo, hi, w_lo, w_hi, c_lo, c_hi, bisect


@triton.jit
def _pick_pivot(lo, hi, w_lo, w_hi, target, xmin, bisect):
    """The next pivot in [lo + 2, hi] (int32 keys, per row): interpolation of W between (value(lo + 1), w_lo)
    and (value(hi), w_hi) at the target, in log W when both ends have mass, else linear; the key midpoint
    where ``bisect`` is set or the interpolation is not finite."""
    lo64 = lo.to(tl.int64)
    hi64 = hi.to(tl.int64)
    mid = lo64 + 1 + (hi64 - lo64) // 2
    v_lo = tl.maximum(_val(lo + 1), xmin)
    v_hi = _val(hi)
    frac_lin = (w_lo - target) / tl.where(w_lo > w_hi, w_lo - w_hi, 1.0)
    use_log = (w_hi > 0) & (target > 0) & (w_lo > w_hi)
    lw_hi = tl.log(tl.where(use_log, w_hi, 1.0))
    frac_log = (tl.log(tl.where(use_log, w_lo, 2.0)) - tl.log(tl.where(use_log, target, 1.5))) / \
        (tl.log(tl.where(use_log, w_lo, 2.0)) - lw_hi)
    frac = tl.minimum(tl.maximum(tl.where(use_log, frac_log, frac_lin), 0.0), 1.0)
    v = v_lo + (v_hi - v_lo) * frac
    finite = (v == v) & (tl.abs(v) < float("inf"))
    interp = _key(tl.where(finite, v, 0.0)).to(tl.int64) + 1  # just above the predicted threshold
    piv = tl.where(bisect | ~finite, mid, interp)
    piv = tl.minimum(tl.maximum(piv, lo64 + 2), hi64)
    return piv.to(tl.int32)


@triton.jit
def _search(active, lo, hi, c_lo, target, comp, n_c, c_top, w_top, guess, passes,
            x_ptr, row_off, stride_v, V, cv_ptr, ci_ptr, crow_off, rmask, m, c2, xmin,
            USE_MASS: tl.constexpr, USE_GUESS: tl.constexpr, MULTI: tl.constexpr, BLOCK_B: tl.constexpr,
            BLOCK_V: tl.constexpr):
    """The exact threshold search (module docstring) for the rows with ``active`` set.

    In: (lo, hi] the initial bracket (hi = key(max)), c_lo = #(key > lo); target = k (count search) or
    top_p (USE_MASS: the target becomes top_p * W(> lo), measured by the first pass). guess: a first pivot
    value (NaN: none). Candidates (MULTI): comp / n_c / c_top / w_top as in _any_pass, made here once the
    undecided tokens fit. Returns (threshold key = hi, #(key >= threshold), comp, n_c, c_top, w_top, passes);
    passes[:, 0] counts the passes over the logits, passes[:, 1] all passes.
    """
    w_hi = tl.zeros([BLOCK_B], dtype=tl.float32)  # W(> hi): nothing is above the max
    c_hi = tl.zeros([BLOCK_B], dtype=tl.int32)
    w_lo = c_lo.to(tl.float32)  # W(> lo); the mass search measures it in its first pass
    bisect = tl.zeros([BLOCK_B], dtype=tl.int1)
    pass_cols = tl.arange(0, 2)[None, :]

    # First pass: the guess, else the key midpoint (the interpolation needs W(> lo), unknown for mass).
    if tl.max(active.to(tl.int32), axis=0) > 0:
        if MULTI:
            comp, n_c, c_top, w_top, passes = _maybe_compact(
                active, lo, hi, c_lo, c_hi, w_hi, comp, n_c, c_top, w_top, passes,
                x_ptr, row_off, stride_v, V, cv_ptr, ci_ptr, crow_off, rmask, USE_MASS, BLOCK_B, BLOCK_V)
        piv = _pick_pivot(lo, hi, w_lo, w_hi, target, xmin, active)
        if USE_GUESS:
            use_guess = (guess == guess) & (tl.abs(guess) < float("inf"))
            piv = tl.where(use_guess, tl.minimum(tl.maximum(_key(tl.where(use_guess, guess, 0.0)), lo + 2), hi), piv)
        s, cnt, a, b, w_above = _any_pass(x_ptr, row_off, stride_v, V, cv_ptr, ci_ptr, crow_off, n_c, comp, c_top,
                                          w_top, rmask, piv, lo, m, c2, USE_MASS, USE_MASS, MULTI, BLOCK_B, BLOCK_V)
        passes += tl.where(active, 1, 0)[:, None] * tl.where(pass_cols == 0, tl.where(comp > 0, 0, 1)[:, None], 1)
        if USE_MASS:
            target = target * w_above
            w_lo = w_above
        active, lo, hi, w_lo, w_hi, c_lo, c_hi, bisect = _search_update(
            active, lo, hi, w_lo, w_hi, c_lo, c_hi, bisect, s, cnt, a, b, target)

    while tl.max(active.to(tl.int32), axis=0) > 0:
        if MULTI:
            comp, n_c, c_top, w_top, passes = _maybe_compact(
                active, lo, hi, c_lo, c_hi, w_hi, comp, n_c, c_top, w_top, passes,
                x_ptr, row_off, stride_v, V, cv_ptr, ci_ptr, crow_off, rmask, USE_MASS, BLOCK_B, BLOCK_V)
        piv = _pick_pivot(lo, hi, w_lo, w_hi, target, xmin, bisect)
        s, cnt, a, b, w_above = _any_pass(x_ptr, row_off, stride_v, V, cv_ptr, ci_ptr, crow_off, n_c, comp, c_top,
                                          w_top, rmask, piv, lo, m, c2, False, USE_MASS, MULTI, BLOCK_B, BLOCK_V)
        passes += tl.where(active, 1, 0)[:, None] * tl.where(pass_cols == 0, tl.where(comp > 0, 0, 1)[:, None], 1)
        active, lo, hi, w_lo, w_hi, c_lo, c_hi, bisect = _search_update(
            active, lo, hi, w_lo, w_hi, c_lo, c_hi, bisect, s, cnt, a, b, target)
    return hi, c_lo, comp, n_c, c_top, w_top, passes


# ----------------------------------------------------------------------------------------------------
# The filter / sample kernel


@triton.jit
def _load_param(ptr, val, idx, rmask, ROW: tl.constexpr, dtype: tl.constexpr, BLOCK_B: tl.constexpr):
    """A per-row parameter: ptr[idx] (ROW) or the scalar val, as [BLOCK_B] of dtype."""
    if ROW:
        out = tl.load(ptr + idx, mask=rmask, other=0).to(dtype)
    else:
        out = tl.full([BLOCK_B], val, dtype=dtype)
    return out


@triton.jit
def _seed_keys(seed_ptr, seed_lo, seed_hi, pidx, rmask, SEED_ROW: tl.constexpr, BLOCK_B: tl.constexpr):
    """(k0, k1, salt) [BLOCK_B] uint32: a per-row int64 seed split in halves with salt 0, or one scalar key
    with salt = row + 1 (as reference.sampling.seed_keys)."""
    if SEED_ROW:
        s = tl.load(seed_ptr + pidx, mask=rmask, other=0).to(tl.int64)
        k0 = (s & 0xFFFFFFFF).to(tl.uint32)
        k1 = ((s >> 32) & 0xFFFFFFFF).to(tl.uint32)
        salt = (pidx * 0).to(tl.uint32)
    else:
        k0 = tl.full([BLOCK_B], seed_lo, dtype=tl.int64).to(tl.uint32)
        k1 = tl.full([BLOCK_B], seed_hi, dtype=tl.int64).to(tl.uint32)
        salt = (pidx + 1).to(tl.uint32)
    return k0, k1, salt


@triton.jit
def _sample_kernel(
    x_ptr,  # [R, V] logits (fp32 / fp16 / bf16), row stride stride_r, column stride stride_v
    R, V, stride_r, stride_v,
    param_div,  # rows per parameter row: 1 (sample) or N + 1 (the verify filter pass over [B, N+1, V])
    # temperature, top_k, top_p, min_p: per-row tensors [R / param_div] (*_ROW) or the scalar *_val
    t_ptr, t_val, k_ptr, k_val, p_ptr, p_val, mp_ptr, mp_val,
    seed_ptr, seed_lo, seed_hi,  # per-row int64 seeds [R / param_div] (SEED_ROW) or one key's 32-bit halves
    tok_ptr,  # MODE_DRAW: [R] int64 tokens out
    mask_ptr,  # MODE_MASK: [R, V] int8 kept mask out (contiguous)
    # MODE_STATS: [R] int32 threshold key, fp32 max logit, fp32 kept mass, int32 argmax
    thr_ptr, max_ptr, z_ptr, amax_ptr,
    cv_ptr, ci_ptr,  # MULTI: [R, BLOCK_V] fp32 / int32 candidate scratch (values, ids)
    nc_ptr,  # MODE_STATS and MULTI: [R] int32 candidates that hold the whole kept set, else -1
    passes_ptr,  # COUNT_PASSES: [R, 2] int32 (passes over the logits, all passes)
    guess_z,  # MULTI: the first pivot is mean + guess_z * std of the row's finite logits
    T_ROW: tl.constexpr, K_ROW: tl.constexpr, P_ROW: tl.constexpr, M_ROW: tl.constexpr, SEED_ROW: tl.constexpr,
    HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, HAS_MINP: tl.constexpr,
    MODE: tl.constexpr, MULTI: tl.constexpr, COUNT_PASSES: tl.constexpr,
    BLOCK_B: tl.constexpr,  # rows per program (1 when MULTI)
    BLOCK_V: tl.constexpr,  # chunk of a row; >= V unless MULTI; the candidate capacity
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    row_off = rows64 * stride_r
    crow_off = rows64 * BLOCK_V
    pidx = rows // param_div
    n_v = tl.full([BLOCK_B], V, dtype=tl.int32)

    t = _load_param(t_ptr, t_val, pidx, rmask, T_ROW, tl.float32, BLOCK_B)
    greedy = t <= 0.0

    # Pass 1: max (the lowest index among equal maxima), min of the finite logits, their mean and std.
    # Lane-wise accumulators, reduced once after the loop.
    best_x = tl.full([BLOCK_B, BLOCK_V], float("-inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.int32)
    min_acc = tl.full([BLOCK_B, BLOCK_V], float("inf"), dtype=tl.float32)
    s1_acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)
    s2_acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)
    nfin_acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        x, ids, valid = _load_chunk(x_ptr, x_ptr, row_off, stride_v, n_v, start, rmask, False, BLOCK_V)
        better = x > best_x  # strictly: a lane keeps its first maximum
        best_i = tl.where(better, ids, best_i)
        best_x = tl.where(better, x, best_x)
        fin = valid & (x > float("-inf"))
        xf = tl.where(fin, x, 0.0)
        min_acc = tl.minimum(min_acc, tl.where(fin, x, float("inf")))
        s1_acc += xf
        s2_acc += xf * xf
        nfin_acc += fin.to(tl.float32)
    m = tl.max(best_x, axis=1)
    amax = tl.min(tl.where(best_x == m[:, None], best_i, INT32_MAX), axis=1)  # lowest index among the maxima
    xmin = tl.min(min_acc, axis=1)
    s1 = tl.sum(s1_acc, axis=1)
    s2 = tl.sum(s2_acc, axis=1)
    nfin = tl.sum(nfin_acc, axis=1)
    passes = tl.zeros([BLOCK_B, 2], dtype=tl.int32) + tl.where(rmask, 1, 0)[:, None]

    live = rmask & ~greedy & (m > float("-inf"))  # sampled rows with something to draw
    c2 = LOG2E / tl.where(greedy, 1.0, t)
    xmin = tl.where(nfin > 0, xmin, 0.0)
    m_all = m  # the row max as found (-inf for a row of -inf: nothing kept)
    m = tl.where(live, m, 0.0)  # u = exp2((x - m) c2) without NaN on rows that are not sampled
    mean = s1 / tl.maximum(nfin, 1.0)
    std = tl.sqrt(tl.maximum(s2 / tl.maximum(nfin, 1.0) - mean * mean, 0.0))
    guess = tl.where(live & (nfin > 0), mean + guess_z * std, float("nan"))

    key_max = _key(m)
    thr = tl.full([BLOCK_B], KEY_NEG_INF, dtype=tl.int32)  # keep every key >= thr
    c_lo = tl.full([BLOCK_B], V, dtype=tl.int32)  # #(key >= thr)
    comp = tl.zeros([BLOCK_B], dtype=tl.int32)  # candidates made
    n_c = tl.zeros([BLOCK_B], dtype=tl.int32)
    c_top = tl.zeros([BLOCK_B], dtype=tl.int32)
    w_top = tl.zeros([BLOCK_B], dtype=tl.float32)
    guess_left = guess
    if HAS_TOPK:
        k = _load_param(k_ptr, k_val, pidx, rmask, K_ROW, tl.int32, BLOCK_B)
        on = live & (k > 0) & (k < V)
        hi, c_k, comp, n_c, c_top, w_top, passes = _search(
            on, thr - 1, key_max, c_lo, k.to(tl.float32), comp, n_c, c_top, w_top, guess, passes,
            x_ptr, row_off, stride_v, V, cv_ptr, ci_ptr, crow_off, rmask, m, c2, xmin,
            False, MULTI, MULTI, BLOCK_B, BLOCK_V)
        thr = tl.where(on, hi, thr)
        c_lo = tl.where(on, c_k, c_lo)
        guess_left = tl.where(on, float("nan"), guess)  # top-p then starts inside the top-k set
    if HAS_TOPP:
        top_p = _load_param(p_ptr, p_val, pidx, rmask, P_ROW, tl.float32, BLOCK_B)
        on = live & (top_p < 1.0)
        hi, c_p, comp, n_c, c_top, w_top, passes = _search(
            on, thr - 1, key_max, c_lo, tl.maximum(top_p, 0.0), comp, n_c, c_top, w_top, guess_left, passes,
            x_ptr, row_off, stride_v, V, cv_ptr, ci_ptr, crow_off, rmask, m, c2, xmin,
            True, MULTI, MULTI, BLOCK_B, BLOCK_V)
        thr = tl.where(on, hi, thr)
        c_lo = tl.where(on, c_p, c_lo)
    if HAS_MINP:
        min_p = tl.minimum(_load_param(mp_ptr, mp_val, pidx, rmask, M_ROW, tl.float32, BLOCK_B), 1.0)
    else:
        min_p = tl.zeros([BLOCK_B], dtype=tl.float32)

    if MODE == 2:
        # The kept mask over the logits: one-hot argmax for greedy rows.
        for start in range(0, V, BLOCK_V):
            x, ids, valid = _load_chunk(x_ptr, x_ptr, row_off, stride_v, n_v, start, rmask, False, BLOCK_V)
            u = tl.exp2((x - m[:, None]) * c2[:, None])
            kept = live[:, None] & (_key(x) >= thr[:, None]) & (u >= min_p[:, None]) & (u > 0.0)
            kept = kept | (greedy[:, None] & (ids == amax[:, None]))
            tl.store(mask_ptr + rows64[:, None] * V + ids, kept.to(tl.int8), mask=valid)
    else:
        if MULTI:
            # Copy the kept set when it fits and nothing above the candidates (if any) is kept.
            make = live & ((comp == 0) | (c_top > 0)) & (c_lo <= BLOCK_V)
            if tl.max(make.to(tl.int32), axis=0) > 0:
                n_c = _compact(x_ptr, row_off, stride_v, V, cv_ptr, ci_ptr, crow_off, rmask, thr - 1,
                               tl.full([BLOCK_B], INT32_MAX, dtype=tl.int32), BLOCK_B, BLOCK_V)
                comp = comp + tl.where(make, 1, 0)
                c_top = tl.where(make, 0, c_top)
                passes += tl.where(make, 1, 0)[:, None]
            use_c = tl.max(((comp > 0) & (c_top == 0)).to(tl.int32), axis=0) > 0
        else:
            use_c = False
        if MODE == 0:
            # The draw: exponential race over the kept tokens.
            k0, k1, salt = _seed_keys(seed_ptr, seed_lo, seed_hi, pidx, rmask, SEED_ROW, BLOCK_B)
            position = pidx * 0
            best = tl.full([BLOCK_B, BLOCK_V], -1.0, dtype=tl.float32)
            best_id = tl.full([BLOCK_B, BLOCK_V], -1, dtype=tl.int32)
            if use_c:
                x, ids, valid = _load_chunk(cv_ptr, ci_ptr, crow_off, 1, n_c, 0, rmask, True, BLOCK_V)
                u = tl.exp2((x - m[:, None]) * c2[:, None])
                kept = valid & live[:, None] & (_key(x) >= thr[:, None]) & (u >= min_p[:, None])
                best, best_id = _race_update(tl.where(kept, u, 0.0), ids, position, STREAM_TOKEN, salt, k0, k1,
                                             best, best_id)
            else:
                for start in range(0, V, BLOCK_V):
                    x, ids, valid = _load_chunk(x_ptr, x_ptr, row_off, stride_v, n_v, start, rmask, False, BLOCK_V)
                    u = tl.exp2((x - m[:, None]) * c2[:, None])
                    kept = valid & live[:, None] & (_key(x) >= thr[:, None]) & (u >= min_p[:, None])
                    best, best_id = _race_update(tl.where(kept, u, 0.0), ids, position, STREAM_TOKEN, salt, k0,
                                                 k1, best, best_id)
                passes += tl.where(rmask, 1, 0)[:, None]
            tok = tl.where(greedy, amax, _race_winner(best, best_id))
            tl.store(tok_ptr + rows, tok.to(tl.int64), mask=rmask)
        else:
            # Statistics for the verify kernel: threshold, max, the kept mass Z (p_i = u_i / Z).
            z_acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)
            if use_c:
                x, ids, valid = _load_chunk(cv_ptr, ci_ptr, crow_off, 1, n_c, 0, rmask, True, BLOCK_V)
                u = tl.exp2((x - m[:, None]) * c2[:, None])
                kept = valid & live[:, None] & (_key(x) >= thr[:, None]) & (u >= min_p[:, None])
                z_acc += tl.where(kept, u, 0.0)
                tl.store(nc_ptr + rows, n_c, mask=rmask)
            else:
                for start in range(0, V, BLOCK_V):
                    x, ids, valid = _load_chunk(x_ptr, x_ptr, row_off, stride_v, n_v, start, rmask, False, BLOCK_V)
                    u = tl.exp2((x - m[:, None]) * c2[:, None])
                    kept = valid & live[:, None] & (_key(x) >= thr[:, None]) & (u >= min_p[:, None])
                    z_acc += tl.where(kept, u, 0.0)
                passes += tl.where(rmask, 1, 0)[:, None]
                if MULTI:
                    tl.store(nc_ptr + rows, n_c * 0 - 1, mask=rmask)
            tl.store(thr_ptr + rows, thr, mask=rmask)
            tl.store(max_ptr + rows, m_all, mask=rmask)
            tl.store(z_ptr + rows, tl.sum(z_acc, axis=1), mask=rmask)
            tl.store(amax_ptr + rows, amax, mask=rmask)
    if COUNT_PASSES:
        cols2 = tl.arange(0, 2)
        tl.store(passes_ptr + rows64[:, None] * 2 + cols2[None, :], passes, mask=rmask[:, None])


# ----------------------------------------------------------------------------------------------------
# Speculative verification: acceptance along the drafts, then the correction / bonus draw


@triton.jit
def _verify_kernel(
    x_ptr, stride_xr, stride_xv,  # target logits as rows r = b (N + 1) + j of [B (N + 1), V]
    d_ptr, stride_db, stride_dn,  # [B, N] int64 draft tokens
    q_ptr, stride_qb, stride_qn, stride_qv,  # HAS_Q: [B, N, V] fp32 draft probabilities
    B, N, V,
    t_ptr, t_val, mp_ptr, mp_val,  # temperature, min_p: [B] or scalar
    seed_ptr, seed_lo, seed_hi,  # per-row int64 seeds [B] (SEED_ROW) or one key's 32-bit halves
    thr_ptr, max_ptr, z_ptr, amax_ptr,  # [B (N + 1)] statistics of the filter pass (MODE_STATS)
    cv_ptr, ci_ptr, nc_ptr,  # MULTI: that pass's candidates; nc >= 0 where they hold the kept set
    tok_ptr,  # [B, N + 1] int64 out (contiguous)
    nacc_ptr,  # [B] int64 out
    T_ROW: tl.constexpr, M_ROW: tl.constexpr, SEED_ROW: tl.constexpr, HAS_Q: tl.constexpr,
    HAS_MINP: tl.constexpr, MULTI: tl.constexpr,
    BLOCK_B: tl.constexpr,  # batch rows per program (1 when MULTI)
    BLOCK_V: tl.constexpr,  # chunk of a row (>= V unless MULTI)
    BLOCK_N: tl.constexpr,  # power of two >= N + 1
):
    bs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = bs < B
    bs64 = bs.to(tl.int64)
    t = _load_param(t_ptr, t_val, bs, bmask, T_ROW, tl.float32, BLOCK_B)
    greedy = t <= 0.0
    c2 = LOG2E / tl.where(greedy, 1.0, t)
    if HAS_MINP:
        min_p = tl.minimum(_load_param(mp_ptr, mp_val, bs, bmask, M_ROW, tl.float32, BLOCK_B), 1.0)
    else:
        min_p = tl.zeros([BLOCK_B], dtype=tl.float32)
    k0, k1, salt = _seed_keys(seed_ptr, seed_lo, seed_hi, bs, bmask, SEED_ROW, BLOCK_B)
    n_v = tl.full([BLOCK_B], V, dtype=tl.int32)

    # Acceptance: accept x_j iff U_j q_j(x_j) < p_j(x_j) (greedy: x_j == argmax), while all before were.
    still = bmask
    nacc = tl.zeros([BLOCK_B], dtype=tl.int32)
    for j in range(0, N):
        r = bs64 * (N + 1) + j
        xj = tl.load(d_ptr + bs64 * stride_db + j * stride_dn, mask=bmask, other=-1)
        ok = (xj >= 0) & (xj < V)  # an id outside the vocabulary has p = 0: rejected
        xc = tl.where(ok, xj, 0).to(tl.int32)
        thr = tl.load(thr_ptr + r, mask=bmask, other=0)
        m = tl.load(max_ptr + r, mask=bmask, other=0.0)
        z = tl.load(z_ptr + r, mask=bmask, other=1.0)
        am = tl.load(amax_ptr + r, mask=bmask, other=0)
        lx = tl.load(x_ptr + r * stride_xr + xc.to(tl.int64) * stride_xv, mask=bmask, other=0.0).to(tl.float32)
        has = ~greedy & (m > float("-inf"))  # a sampled row with something kept (z > 0)
        u = tl.exp2((lx - tl.where(has, m, 0.0)) * c2)
        kept = ok & has & (_key(lx) >= thr) & (u >= min_p) & (u > 0.0)
        p = tl.where(kept, u / tl.where(kept, z, 1.0), 0.0)
        if HAS_Q:
            q = tl.load(q_ptr + bs64 * stride_qb + j * stride_qn + xc.to(tl.int64) * stride_qv, mask=bmask & ok,
                        other=0.0).to(tl.float32)
        else:
            q = tl.full([BLOCK_B], 1.0, dtype=tl.float32)
        zero = bs.to(tl.uint32) * 0
        ra = _philox_word0(zero, zero + j, zero + STREAM_ACCEPT, salt, k0, k1)
        ua = ((ra >> 9).to(tl.float32) * 2.0 + 1.0) * (1.0 / 16777216.0)
        acc = tl.where(greedy, ok & (xc == am), ua * q < p)
        still = still & acc
        nacc += still.to(tl.int32)

    # The emitting position js = nacc: a correction from max(0, p - q) (p where that has no mass) when
    # js < N, else the bonus from p_N. Greedy rows emit the argmax.
    js = nacc
    r = bs64 * (N + 1) + js
    thr = tl.load(thr_ptr + r, mask=bmask, other=0)
    m = tl.load(max_ptr + r, mask=bmask, other=0.0)
    z = tl.load(z_ptr + r, mask=bmask, other=1.0)
    am = tl.load(amax_ptr + r, mask=bmask, other=0)
    live = bmask & ~greedy & (m > float("-inf"))
    m = tl.where(live, m, 0.0)
    inv_z = 1.0 / tl.where(live, z, 1.0)
    residual = js < N
    jq = tl.minimum(js, N - 1).to(tl.int64)  # the rejected position (bonus rows do not read it)
    xr = tl.load(d_ptr + bs64 * stride_db + jq * stride_dn, mask=bmask & residual, other=-1)
    best_r = tl.full([BLOCK_B, BLOCK_V], -1.0, dtype=tl.float32)  # lane-wise races (see _race_step)
    id_r = tl.full([BLOCK_B, BLOCK_V], -1, dtype=tl.int32)
    best_p = tl.full([BLOCK_B, BLOCK_V], -1.0, dtype=tl.float32)
    id_p = tl.full([BLOCK_B, BLOCK_V], -1, dtype=tl.int32)
    n_c = tl.full([BLOCK_B], -1, dtype=tl.int32)
    use_c = False
    if MULTI:
        n_c = tl.load(nc_ptr + r, mask=bmask, other=-1)
        use_c = tl.max(n_c, axis=0) >= 0
    if use_c:
        # The kept set is in the filter pass's candidates: p (and so the residual) is 0 elsewhere.
        x, ids, valid = _load_chunk(cv_ptr, ci_ptr, r * BLOCK_V, 1, n_c, 0, bmask, True, BLOCK_V)
        u = tl.exp2((x - m[:, None]) * c2[:, None])
        kept = valid & live[:, None] & (_key(x) >= thr[:, None]) & (u >= min_p[:, None])
        p = tl.where(kept, u * inv_z[:, None], 0.0)
        if HAS_Q:
            q = tl.load(q_ptr + bs64[:, None] * stride_qb + jq[:, None] * stride_qn + ids.to(tl.int64) * stride_qv,
                        mask=valid & residual[:, None], other=0.0).to(tl.float32)
        else:
            q = ((ids == xr[:, None]) & residual[:, None]).to(tl.float32)
        w = tl.where(residual[:, None], tl.maximum(p - q, 0.0), p)
        if tl.max(tl.max(p, axis=1), axis=0) > 0:
            e = _exp_noise(ids, js, STREAM_TOKEN, salt, k0, k1)
            best_r, id_r = _race_step(w, e, ids, best_r, id_r)
            best_p, id_p = _race_step(p, e, ids, best_p, id_p)
    else:
        for start in range(0, V, BLOCK_V):
            x, ids, valid = _load_chunk(x_ptr, x_ptr, r * stride_xr, stride_xv, n_v, start, bmask, False, BLOCK_V)
            u = tl.exp2((x - m[:, None]) * c2[:, None])
            kept = valid & live[:, None] & (_key(x) >= thr[:, None]) & (u >= min_p[:, None])
            p = tl.where(kept, u * inv_z[:, None], 0.0)
            if HAS_Q:
                q = tl.load(q_ptr + bs64[:, None] * stride_qb + jq[:, None] * stride_qn + ids.to(tl.int64) * stride_qv,
                            mask=valid & residual[:, None], other=0.0).to(tl.float32)
            else:
                q = ((ids == xr[:, None]) & residual[:, None]).to(tl.float32)
            w = tl.where(residual[:, None], tl.maximum(p - q, 0.0), p)
            if tl.max(tl.max(p, axis=1), axis=0) > 0:  # the residual is 0 wherever p is
                e = _exp_noise(ids, js, STREAM_TOKEN, salt, k0, k1)
                best_r, id_r = _race_step(w, e, ids, best_r, id_r)
                best_p, id_p = _race_step(p, e, ids, best_p, id_p)
    win_r = _race_winner(best_r, id_r)
    emitted = tl.where(greedy, am, tl.where(win_r >= 0, win_r, _race_winner(best_p, id_p)))

    cols = tl.arange(0, BLOCK_N)
    dmask = bmask[:, None] & (cols[None, :] < N)
    drafts = tl.load(d_ptr + bs64[:, None] * stride_db + cols[None, :] * stride_dn, mask=dmask, other=-1)
    out = tl.where(cols[None, :] < js[:, None], drafts, -1)
    out = tl.where(cols[None, :] == js[:, None], emitted[:, None].to(tl.int64), out)
    tl.store(tok_ptr + bs64[:, None] * (N + 1) + cols[None, :], out, mask=bmask[:, None] & (cols[None, :] <= N))
    tl.store(nacc_ptr + bs, nacc.to(tl.int64), mask=bmask)


# ----------------------------------------------------------------------------------------------------
# Launchers


def _blocks(v: int, rows: int, device: torch.device, block_v: Optional[int]) -> tuple[int, int, bool]:
    """(BLOCK_B, BLOCK_V, MULTI). A row of V <= the chunk is one chunk and rows are packed to fill the tile
    budget; longer rows run one per program in chunks of BLOCK_V (also the candidate capacity).
    ``block_v`` overrides the chunk (a power of two; tests use small ones to reach the long-row path)."""
    chunk = block_v if block_v is not None else (GPU_BLOCK_V if device.type == "cuda" else tile_budget(device))
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"r1kernels.triton.sampling: block_v must be a power of two >= 16, got {chunk}")
    bv = triton.next_power_of_2(v)
    if bv <= chunk:
        return max(1, min(triton.next_power_of_2(rows), tile_budget(device) // bv)), bv, False
    return 1, chunk, True


def _warps(block_b: int, block_v: int, multi: bool) -> int:
    """Long rows: 16 warps (8 lanes of the 4096 chunk per thread; ptxas fits the kernel in 112 registers
    for sm_90, where 8 warps take 244). Short rows: by tile size."""
    return 16 if multi and block_b * block_v >= 4096 else num_warps_for(block_b * block_v)


def _param(value, dtype: torch.dtype, dummy: torch.Tensor) -> tuple[torch.Tensor, object, bool]:
    """(tensor or a dummy pointer, scalar or 0, per-row?) for a kernel parameter pair (ptr, val, ROW)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1), 0, True
    return dummy, (float(value) if dtype.is_floating_point else int(value)), False


def _seed(seed, dummy: torch.Tensor) -> tuple[torch.Tensor, int, int, bool]:
    """(per-row seeds or a dummy, key low half, key high half, per-row?) (see reference.sampling.seed_keys)."""
    if isinstance(seed, torch.Tensor):
        return seed.reshape(-1), 0, 0, True
    s = int(seed) % 2**64
    return dummy, s & 0xFFFFFFFF, s >> 32, False


def _filter_args(x: torch.Tensor, temperature, top_k, top_p, min_p) -> tuple[list, dict]:
    """The parameter arguments (t, k, p, min_p pairs) and the HAS_* / *_ROW flags of _sample_kernel."""
    v = x.shape[-1]
    t_arg = _param(temperature, torch.float32, x)
    k_arg = _param(top_k, torch.int64, x)
    p_arg = _param(top_p, torch.float32, x)
    m_arg = _param(min_p, torch.float32, x)
    all_greedy = not t_arg[2] and t_arg[1] <= 0  # one scalar temperature of 0: argmax only
    flags = dict(
        T_ROW=t_arg[2], K_ROW=k_arg[2], P_ROW=p_arg[2], M_ROW=m_arg[2],
        HAS_TOPK=not all_greedy and (k_arg[2] or 0 < k_arg[1] < v),
        HAS_TOPP=not all_greedy and (p_arg[2] or p_arg[1] < 1.0),
        HAS_MINP=not all_greedy and (m_arg[2] or m_arg[1] > 0.0),
    )
    args = [t_arg[0], t_arg[1], k_arg[0], k_arg[1], p_arg[0], p_arg[1], m_arg[0], m_arg[1]]
    return args, flags


def _guess_z(v: int, block_v: int) -> float:
    """z with about block_v / 2 of v standard-normal values above mean + z std: the first pivot of a long row."""
    return statistics.NormalDist().inv_cdf(1.0 - min(0.5, block_v / (2.0 * v)))


def _launch_filter(x: torch.Tensor, param_div: int, params: tuple, seed, mode: int, block_v: Optional[int],
                   count_passes: bool) -> dict:
    """Run _sample_kernel over the rows of x ``[R, V]``; returns the outputs of ``mode`` (and ``passes``)."""
    r, v = x.shape
    dev = x.device
    block_b, bv, multi = _blocks(v, r, dev, block_v)
    pargs, flags = _filter_args(x, *params)
    seed_t, seed_lo, seed_hi, seed_row = _seed(seed, x)
    out: dict = {}
    i32 = dict(dtype=torch.int32, device=dev)
    f32 = dict(dtype=torch.float32, device=dev)
    out["tokens"] = torch.empty(r, dtype=torch.int64, device=dev) if mode == MODE_DRAW else None
    out["mask"] = torch.empty((r, v), dtype=torch.int8, device=dev) if mode == MODE_MASK else None
    if mode == MODE_STATS:
        out.update(thr=torch.empty(r, **i32), max=torch.empty(r, **f32), z=torch.empty(r, **f32),
                   amax=torch.empty(r, **i32), nc=torch.empty(r, **i32) if multi else None)
    out["cv"] = torch.empty((r, bv), **f32) if multi else None
    out["ci"] = torch.empty((r, bv), **i32) if multi else None
    out["passes"] = torch.zeros((r, 2), **i32) if count_passes else None
    out["multi"], out["block_v"] = multi, bv

    def ptr(name):
        return out[name] if out.get(name) is not None else x

    _sample_kernel[(triton.cdiv(r, block_b),)](
        x, r, v, x.stride(0), x.stride(1), param_div, *pargs, seed_t, seed_lo, seed_hi,
        ptr("tokens"), ptr("mask"), ptr("thr"), ptr("max"), ptr("z"), ptr("amax"), ptr("cv"), ptr("ci"), ptr("nc"),
        ptr("passes"), _guess_z(v, bv) if multi else 0.0,
        SEED_ROW=seed_row, MODE=mode, MULTI=multi, COUNT_PASSES=count_passes, BLOCK_B=block_b, BLOCK_V=bv,
        num_warps=_warps(block_b, bv, multi), **flags,
    )
    return out


def _check_logits(fn: str, x: torch.Tensor) -> None:
    if x.dtype not in _FLOATS or x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"r1kernels.triton.sampling.{fn}: logits must be fp32 / fp16 / bf16 [R, V] with V >= 1, "
                         f"got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] >= 2**31 - 2 * GPU_BLOCK_V:
        raise ValueError(f"r1kernels.triton.sampling.{fn}: V = {x.shape[1]} does not fit int32 token ids")


def sample(logits: torch.Tensor, temperature, top_k=0, top_p=1.0, min_p=0.0, seed=0, *, block_v: Optional[int] = None,
           return_passes: bool = False):
    """Tokens ``[B]`` int64 drawn as ``reference.sampling.sample`` specifies (parameters: scalars or ``[B]``
    tensors on the logits' device; seed: int or int64 ``[B]``). With ``return_passes`` also ``[B, 2]`` int32:
    passes over the logits and passes in all (candidates included) per row."""
    _check_logits("sample", logits)
    out = _launch_filter(logits, 1, (temperature, top_k, top_p, min_p), seed, MODE_DRAW, block_v, return_passes)
    return (out["tokens"], out["passes"]) if return_passes else out["tokens"]


def filter_mask(logits: torch.Tensor, temperature, top_k=0, top_p=1.0, min_p=0.0, *,
                block_v: Optional[int] = None) -> torch.Tensor:
    """The kept set ``[B, V]`` bool: the tokens of nonzero probability in ``reference.filtered_probs``
    (one-hot argmax for greedy rows). Found by the same search as :func:`sample`."""
    _check_logits("filter_mask", logits)
    out = _launch_filter(logits, 1, (temperature, top_k, top_p, min_p), 0, MODE_MASK, block_v, False)
    return out["mask"].bool()


def speculative_verify(draft_tokens: torch.Tensor, draft_probs: Optional[torch.Tensor], target_logits: torch.Tensor,
                       temperature, top_k=0, top_p=1.0, min_p=0.0, seed=0, *, block_v: Optional[int] = None):
    """``(tokens [B, N + 1] int64, num_accepted [B] int64)`` as ``reference.sampling.speculative_verify``.

    Two launches, no host sync: the filter kernel over the B (N + 1) target rows writes each row's threshold,
    max, kept mass and argmax (and keeps its candidates); the verify kernel walks the drafts of each batch
    row and draws the correction or bonus token in one pass over one row.
    """
    b, n = draft_tokens.shape
    v = target_logits.shape[-1]
    x = target_logits.reshape(b * (n + 1), v)  # [B (N+1), V], a view when the first two dims merge
    _check_logits("speculative_verify", x)
    tokens = torch.empty((b, n + 1), dtype=torch.int64, device=x.device)
    nacc = torch.empty(b, dtype=torch.int64, device=x.device)
    if b == 0:
        return tokens, nacc
    st = _launch_filter(x, n + 1, (temperature, top_k, top_p, min_p), 0, MODE_STATS, block_v, False)
    block_b, bv, multi = _blocks(v, b, x.device, block_v)
    if multi != st["multi"]:  # the filter pass saw B (N + 1) rows; long rows are one per program either way
        raise AssertionError("r1kernels.triton.sampling: filter and verify passes disagree on the row layout")
    t_arg = _param(temperature, torch.float32, x)
    m_arg = _param(min_p, torch.float32, x)
    has_minp = m_arg[2] or m_arg[1] > 0.0
    seed_t, seed_lo, seed_hi, seed_row = _seed(seed, x)
    q = draft_probs if draft_probs is not None else x
    qs = (q.stride(0), q.stride(1), q.stride(2)) if draft_probs is not None else (0, 0, 0)
    d = draft_tokens
    _verify_kernel[(triton.cdiv(b, block_b),)](
        x, x.stride(0), x.stride(1), d, d.stride(0), d.stride(1), q, *qs, b, n, v,
        t_arg[0], t_arg[1], m_arg[0], m_arg[1], seed_t, seed_lo, seed_hi,
        st["thr"], st["max"], st["z"], st["amax"],
        st["cv"] if multi else x, st["ci"] if multi else x, st["nc"] if multi else x,
        tokens, nacc,
        T_ROW=t_arg[2], M_ROW=m_arg[2], SEED_ROW=seed_row, HAS_Q=draft_probs is not None, HAS_MINP=has_minp,
        MULTI=multi, BLOCK_B=block_b, BLOCK_V=bv, BLOCK_N=triton.next_power_of_2(n + 1),
        num_warps=_warps(block_b, bv, multi),
    )
    return tokens, nacc
