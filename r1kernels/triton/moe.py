"""Routed experts in Triton: grouped GEMMs over expert-sorted rows, forward and backward.

Letters:
    T tokens, D hidden size, E routed experts, K experts per token, I expert intermediate size.
    slot ``s = t * K + k``: token t's k-th choice; ``T * K`` slots in all, ``T * K`` is also the padding
    sentinel in the sorted list.
    BM the row block of the grouped GEMMs (= the ``block_size`` given to ``moe_align``).
    S_max the length of the sorted, padded slot list (``moe_align``'s bound; depends on shapes only).
    A ``[S_max, I]`` the activation silu(gate) * up, one row per position of the sorted list.
    H ``[S_max, 2I]`` the pre-activations [gate | up] (kept for the backward), same rows.
    dH ``[S_max, 2I]`` its gradient [dgate | dup].

The forward is two grouped GEMMs over the sorted list from ``moe_align`` (each block of BM rows belongs to
one expert; a program reads its expert from ``block_expert``):

1. ``_gate_up_kernel``: rows of x read through ``token = slot // K`` (no gathered copy of x) times the
   expert's W1 and W3 rows, two fp32 accumulators, SiLU * mul in the epilogue -> A (and H when a backward
   will follow).
2. ``_scatter_gemm_kernel``: A @ W2_e^T, times the slot's routing weight, then either atomically added into
   an fp32 ``[T, D]`` buffer at the token's row, or (deterministic mode, or K = 1 where a token has one
   slot) stored as one row per slot; ``_sum_slots_kernel`` then adds each token's K rows in a fixed order.

The backward:

3. ``_down_bwd_kernel``: G = dy[token] @ W2_e per sorted row; its epilogue recomputes A from H and gives
   d(weight)[slot] = <G, A> (partial sums per I tile, summed in a fixed order) and, with dA = weight * G,
   dH through the SiLU * mul derivative.
4. ``_w2_grad_kernel`` / ``_w13_grad_kernel``: one program per (expert, output tile) loops over that
   expert's blocks: dW2_e = sum_rows (weight * dy[token])^T A, dW13_e = sum_rows dH^T x[token]; no atomics,
   so weight gradients are always deterministic.
5. ``_scatter_gemm_kernel`` again for dx: dH @ W13_e, scattered to the token rows like the forward.

Memory kept for the backward: H (2 * S_max * I elements in x's dtype) and the align outputs. A is not kept
(recomputed element-wise from H where the backward needs it: a few flops per element instead of
S_max * I more elements), and the gate/up GEMM is not recomputed (it is two thirds of the forward flops).
Without a backward (inference) H is not written.

No launcher reads device data on the host: grids depend on T, K, E, D, I and BM only; programs whose block
is unused (``block_expert == -1``, or past ``num_padded``) return at once. All accumulation is fp32;
fp32 dots use IEEE precision (no TF32), so fp32 results match an fp32 reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, D] tokens, any strides
    w13_ptr,  # [E, 2I, D] expert gate (rows [:I]) and up (rows [I:]) weights, any strides
    a_ptr,  # [S_max, I] output A = silu(gate) * up in x's dtype, row stride stride_am, columns contiguous
    h_ptr,  # [S_max, 2I] output H = [gate | up] in x's dtype (written when SAVE_H), row stride stride_hm
    sorted_slots_ptr,  # [S_max] int32 slots sorted by expert, sentinel N_SLOTS for padding
    block_expert_ptr,  # [S_max / BLOCK_M] int32 expert of each row block, -1 for unused blocks
    num_padded_ptr,  # [1] int32 used length of the sorted list
    N_SLOTS,  # T * K
    K,  # experts per token (token = slot // K)
    D,
    I,
    stride_xt, stride_xd,
    stride_we, stride_wn, stride_wd,
    stride_am,
    stride_hm,
    BLOCK_M: tl.constexpr,  # rows per program: the align block, so all rows share one expert
    BLOCK_N: tl.constexpr,  # columns of I per program (the same columns of gate and of up)
    BLOCK_K: tl.constexpr,  # step over D
    SAVE_H: tl.constexpr,  # also write the pre-activations for the backward
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_padded = tl.load(num_padded_ptr)
    if pid_m * BLOCK_M >= num_padded:
        return
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # positions in the sorted list
    slots = tl.load(sorted_slots_ptr + rows)
    valid = slots < N_SLOTS  # padding rows read zeros, so their A and H rows are 0
    tokens = (slots // K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < I
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xd  # [BM, BK]
    w_base = w13_ptr + expert.to(tl.int64) * stride_we  # an expert's offset can pass 2^31 elements
    wg_ptrs = w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wd  # [BK, BN]: W1^T tile
    wu_ptrs = wg_ptrs + I * stride_wn  # W3^T tile: the up rows start I rows below the gate rows
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = (k0 + ks) < D
        xt = tl.load(x_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        wg = tl.load(wg_ptrs, mask=w_mask, other=0.0)
        wu = tl.load(wu_ptrs, mask=w_mask, other=0.0)
        acc_g = tl.dot(xt, wg, acc_g, input_precision="ieee")
        acc_u = tl.dot(xt, wu, acc_u, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xd
        wg_ptrs += BLOCK_K * stride_wd
        wu_ptrs += BLOCK_K * stride_wd

    act = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up from the fp32 accumulators: one rounding
    rows64 = rows.to(tl.int64)
    out_mask = (rows < num_padded)[:, None] & col_mask[None, :]
    tl.store(a_ptr + rows64[:, None] * stride_am + cols[None, :], act.to(a_ptr.dtype.element_ty), mask=out_mask)
    if SAVE_H:
        h_ptrs = h_ptr + rows64[:, None] * stride_hm + cols[None, :]
        tl.store(h_ptrs, acc_g.to(h_ptr.dtype.element_ty), mask=out_mask)
        tl.store(h_ptrs + I, acc_u.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _scatter_gemm_kernel(
    in_ptr,  # [S_max, KD] rows in sorted order (A in the forward, dH in the backward), row stride stride_im, columns contiguous
    w_ptr,  # [E, ...] expert matrices; element (k, n) of expert e at e*stride_we + k*stride_wk + n*stride_wn
    scale_ptr,  # [T * K] fp32 routing weight per slot (read when HAS_SCALE)
    out_ptr,  # ATOMIC: [T, N] fp32, added into at token rows; else [T * K, N], one row per slot (stored)
    sorted_slots_ptr,  # [S_max] int32
    block_expert_ptr,  # [S_max / BLOCK_M] int32
    num_padded_ptr,  # [1] int32
    N_SLOTS,  # T * K
    K,  # experts per token
    KD,  # the reduced dim (I forward, 2I for dx)
    N,  # output columns (D)
    stride_im,
    stride_we, stride_wk, stride_wn,
    stride_om,  # row stride of out (columns contiguous)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # step over KD
    HAS_SCALE: tl.constexpr,  # multiply each row by its slot's routing weight
    ATOMIC: tl.constexpr,  # scatter-add into token rows (else store per-slot rows)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_padded = tl.load(num_padded_ptr)
    if pid_m * BLOCK_M >= num_padded:
        return
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + rows)
    valid = slots < N_SLOTS
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)

    # Rows of a used block are all written by the first GEMM (padding rows as zeros): no row mask needed.
    in_ptrs = in_ptr + rows.to(tl.int64)[:, None] * stride_im + ks[None, :]  # [BM, BK]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        k_mask = (k0 + ks) < KD
        a = tl.load(in_ptrs, mask=k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision="ieee")
        in_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    if HAS_SCALE:
        scale = tl.load(scale_ptr + slots, mask=valid, other=0.0)
        acc = acc * scale[:, None]
    out_mask = valid[:, None] & col_mask[None, :]
    if ATOMIC:
        tokens = (slots // K).to(tl.int64)
        tl.atomic_add(out_ptr + tokens[:, None] * stride_om + cols[None, :], acc, mask=out_mask)
    else:
        slots64 = slots.to(tl.int64)
        tl.store(out_ptr + slots64[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _sum_slots_kernel(
    src_ptr,  # [T * K, N] fp32 per-slot rows, contiguous
    out_ptr,  # [T, N] output (fp32 / fp16 / bf16), row stride stride_om, columns contiguous
    T,
    K,
    N,
    stride_om,
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_N: tl.constexpr,  # columns per program
):
    toks = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (toks < T)[:, None] & (cols < N)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k in range(0, K):  # k = 0, 1, ... in order: the same sum on every run
        acc += tl.load(src_ptr + (toks * K + k)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + toks[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _down_bwd_kernel(
    dy_ptr,  # [T, D] gradient of y, any strides
    w2_ptr,  # [E, D, I] down weights, any strides
    h_ptr,  # [S_max, 2I] pre-activations [gate | up] from the forward, row stride stride_hm
    scale_ptr,  # [T * K] fp32 routing weights per slot
    dh_ptr,  # [S_max, 2I] output dH = [dgate | dup] in x's dtype, row stride stride_dhm
    dscale_part_ptr,  # [cdiv(I, BLOCK_N), T * K] fp32 output: this I tile's share of d(weight) per slot
    sorted_slots_ptr,  # [S_max] int32
    block_expert_ptr,  # [S_max / BLOCK_M] int32
    num_padded_ptr,  # [1] int32
    N_SLOTS,  # T * K
    K,
    D,
    I,
    stride_dyt, stride_dyd,
    stride_we, stride_wd, stride_wi,
    stride_hm,
    stride_dhm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # columns of I per program
    BLOCK_K: tl.constexpr,  # step over D
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_padded = tl.load(num_padded_ptr)
    if pid_m * BLOCK_M >= num_padded:
        return
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + rows)
    valid = slots < N_SLOTS
    tokens = (slots // K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < I
    ks = tl.arange(0, BLOCK_K)

    # G = dy[token] @ W2_e  ([BM, D] @ [D, I]): the gradient of A before the routing weight.
    dy_ptrs = dy_ptr + tokens[:, None] * stride_dyt + ks[None, :] * stride_dyd  # [BM, BK]
    w_ptrs = w2_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wd + cols[None, :] * stride_wi  # [BK, BN]
    g_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = (k0 + ks) < D
        dyt = tl.load(dy_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        g_acc = tl.dot(dyt, w, g_acc, input_precision="ieee")
        dy_ptrs += BLOCK_K * stride_dyd
        w_ptrs += BLOCK_K * stride_wd

    rows64 = rows.to(tl.int64)
    out_mask = (rows < num_padded)[:, None] & col_mask[None, :]
    h_ptrs = h_ptr + rows64[:, None] * stride_hm + cols[None, :]
    gate = tl.load(h_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptrs + I, mask=out_mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    act = silu * up  # A, recomputed instead of kept

    # d(weight)[slot] = <dy[token], A W2_e^T> = <G, A>, summed over this I tile here and over tiles later.
    dscale = tl.sum(g_acc * act, axis=1)
    tl.store(dscale_part_ptr + pid_n.to(tl.int64) * N_SLOTS + slots, dscale, mask=valid)

    scale = tl.load(scale_ptr + slots, mask=valid, other=0.0)
    da = g_acc * scale[:, None]
    dup = da * silu
    dgate = da * up * sig * (1.0 + gate * (1.0 - sig))  # silu'(g) = sig * (1 + g * (1 - sig))
    dh_ptrs = dh_ptr + rows64[:, None] * stride_dhm + cols[None, :]
    tl.store(dh_ptrs, dgate.to(dh_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dh_ptrs + I, dup.to(dh_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _w2_grad_kernel(
    dy_ptr,  # [T, D] gradient of y, any strides
    h_ptr,  # [S_max, 2I] pre-activations [gate | up], row stride stride_hm
    scale_ptr,  # [T * K] fp32 routing weights per slot
    dw2_ptr,  # [E, D, I] output in w2's dtype, contiguous
    sorted_slots_ptr,  # [S_max] int32
    block_lo_ptr,  # [E] int32 first row block of each expert's run
    block_hi_ptr,  # [E] int32 one past its last row block
    N_SLOTS,
    K,
    D,
    I,
    stride_dyt, stride_dyd,
    stride_hm,
    BLOCK_M: tl.constexpr,  # the align block: the loop steps one block at a time
    BLOCK_D: tl.constexpr,  # output rows (D) per program
    BLOCK_I: tl.constexpr,  # output columns (I) per program
):
    expert = tl.program_id(0)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)
    d_mask = ds < D
    col_mask = cols < I
    lo = tl.load(block_lo_ptr + expert)
    hi = tl.load(block_hi_ptr + expert)

    # dW2_e = sum over the expert's rows of (weight * dy[token])^T A: one program owns the tile, so the
    # rows are summed in one fixed order (no atomics); an expert with no rows gets zeros.
    acc = tl.zeros((BLOCK_D, BLOCK_I), dtype=tl.float32)
    for blk in range(lo, hi):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(sorted_slots_ptr + rows)
        valid = slots < N_SLOTS
        tokens = (slots // K).to(tl.int64)
        scale = tl.load(scale_ptr + slots, mask=valid, other=0.0)
        dyt = tl.load(dy_ptr + tokens[None, :] * stride_dyt + ds[:, None] * stride_dyd,
                      mask=d_mask[:, None] & valid[None, :], other=0.0).to(tl.float32)  # [BD, BM]: dy^T
        wdy = (dyt * scale[None, :]).to(dy_ptr.dtype.element_ty)
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
        gate = tl.load(h_ptrs, mask=col_mask[None, :], other=0.0).to(tl.float32)
        up = tl.load(h_ptrs + I, mask=col_mask[None, :], other=0.0).to(tl.float32)
        act = (gate * tl.sigmoid(gate) * up).to(dy_ptr.dtype.element_ty)  # [BM, BI]
        acc = tl.dot(wdy, act, acc, input_precision="ieee")

    out_ptrs = dw2_ptr + expert.to(tl.int64) * D * I + ds.to(tl.int64)[:, None] * I + cols[None, :]
    tl.store(out_ptrs, acc.to(dw2_ptr.dtype.element_ty), mask=d_mask[:, None] & col_mask[None, :])


@triton.jit
def _w13_grad_kernel(
    x_ptr,  # [T, D] tokens, any strides
    dh_ptr,  # [S_max, 2I] dH = [dgate | dup], row stride stride_dhm, columns contiguous
    dw13_ptr,  # [E, 2I, D] output in w13's dtype, contiguous
    sorted_slots_ptr,  # [S_max] int32
    block_lo_ptr,  # [E] int32
    block_hi_ptr,  # [E] int32
    N_SLOTS,
    K,
    D,
    N2,  # 2I
    stride_xt, stride_xd,
    stride_dhm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # output rows (of 2I) per program
    BLOCK_D: tl.constexpr,  # output columns (D) per program
):
    expert = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_mask = ns < N2
    d_mask = ds < D
    lo = tl.load(block_lo_ptr + expert)
    hi = tl.load(block_hi_ptr + expert)

    # dW13_e = sum over the expert's rows of dH^T x[token]; dH's columns are w13's rows (gate then up).
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for blk in range(lo, hi):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(sorted_slots_ptr + rows)
        valid = slots < N_SLOTS
        tokens = (slots // K).to(tl.int64)
        dht = tl.load(dh_ptr + rows.to(tl.int64)[None, :] * stride_dhm + ns[:, None],
                      mask=n_mask[:, None], other=0.0)  # [BN, BM]: dH^T
        xt = tl.load(x_ptr + tokens[:, None] * stride_xt + ds[None, :] * stride_xd,
                     mask=valid[:, None] & d_mask[None, :], other=0.0)  # [BM, BD]
        acc = tl.dot(dht, xt, acc, input_precision="ieee")

    out_ptrs = dw13_ptr + expert.to(tl.int64) * N2 * D + ns.to(tl.int64)[:, None] * D + ds[None, :]
    tl.store(out_ptrs, acc.to(dw13_ptr.dtype.element_ty), mask=n_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------------------------------------
# Launchers


def _tile(n: int, cap: int) -> int:
    """A power-of-two tile edge for a dim of n: at least 16 (tl.dot's minimum), at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _caps(device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
    """(column tile cap, reduction step cap). On a GPU: 64-wide tiles, a 32-deep step in fp32 (twice the bytes
    per element in shared memory). Under the interpreter each program step is a Python-level pass, so whole
    small dims in one tile are fastest."""
    if device.type == "cuda":
        return 64, (32 if dtype == torch.float32 else 64)
    return 128, 128


def _launch_opts(device: torch.device) -> dict:
    """4 warps for 64 x 64 fp32 accumulators (two in the gate/up kernel); 3 stages of operand tiles fit the
    shared memory at the tile caps above. The interpreter takes neither."""
    return dict(num_warps=4, num_stages=3) if device.type == "cuda" else {}


def moe_block_m(num_slots: int, num_experts: int) -> int:
    """The row block BM for ``moe_align`` and the grouped GEMMs: about the mean rows per expert, as a power of
    two in [16, 64] (16 is tl.dot's minimum; small blocks waste less padding when experts get few rows, as
    in decode, larger ones reuse each weight tile over more rows)."""
    mean = -(-max(num_slots, 1) // max(num_experts, 1))
    return max(16, min(64, triton.next_power_of_2(mean)))


def _check_args(fn, x, w13, w2, weights, sorted_slots, block_expert, num_padded, block_m) -> None:
    """Shapes, dtypes and devices of the forward's arguments (shared by both launchers; ``fn`` names the caller)."""
    if x.dtype not in _FLOATS or x.dim() != 2:
        raise TypeError(f"{fn}: x must be a 2-D float32 / float16 / bfloat16 tensor, got {x.dtype} {tuple(x.shape)}")
    t, d = x.shape
    if w13.dim() != 3 or w13.shape[1] % 2 or w13.shape[2] != d:
        raise ValueError(f"{fn}: w13 must be [E, 2I, D={d}], got {tuple(w13.shape)}")
    e, two_i = w13.shape[0], w13.shape[1]
    if tuple(w2.shape) != (e, d, two_i // 2):
        raise ValueError(f"{fn}: w2 must be [E={e}, D={d}, I={two_i // 2}], got {tuple(w2.shape)}")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise TypeError(f"{fn}: w13 and w2 must have x's dtype {x.dtype}, got {w13.dtype}, {w2.dtype}")
    if weights.dim() != 2 or weights.shape[0] != t or weights.dtype != torch.float32:
        raise ValueError(f"{fn}: weights must be float32 [T={t}, K], got {weights.dtype} {tuple(weights.shape)}")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"{fn}: block_m must be a power of two >= 16 (tl.dot's minimum), got {block_m}")
    s_max = _s_max(t * weights.shape[1], e, block_m)
    for name, tensor, shape in (("sorted_slots", sorted_slots, (s_max,)), ("block_expert", block_expert, (s_max // block_m,)),
                                ("num_padded", num_padded, (1,))):
        if tensor.dtype != torch.int32 or tuple(tensor.shape) != shape:
            raise ValueError(f"{fn}: {name} must be int32 {list(shape)} (moe_align with block_size={block_m}), "
                             f"got {tensor.dtype} {tuple(tensor.shape)}")
    for name, tensor in (("w13", w13), ("w2", w2), ("weights", weights), ("sorted_slots", sorted_slots),
                         ("block_expert", block_expert), ("num_padded", num_padded)):
        if tensor.device != x.device:
            raise ValueError(f"{fn}: {name} is on {tensor.device}, x on {x.device}")


def _s_max(n_slots: int, num_experts: int, block_m: int) -> int:
    """``moe_align``'s length of the sorted list: every slot plus at most BM - 1 padding rows per used expert."""
    return -(-(n_slots + min(num_experts, n_slots) * (block_m - 1)) // block_m) * block_m


def _scatter(inp, w, w_strides, scale, sorted_slots, block_expert, num_padded, t, k, n, block_m, deterministic, out_dtype):
    """Run ``_scatter_gemm_kernel`` (rows of ``inp`` times their expert's matrix, scattered to token rows) and
    reduce to ``[T, n]`` in ``out_dtype``: atomics into fp32, or per-slot rows summed in a fixed order, or
    (K = 1: one slot per token, nothing to add) stored straight into the output."""
    dev = inp.device
    kd = inp.shape[1]
    cap_n, cap_k = _caps(dev, inp.dtype)
    block_n, block_k = _tile(n, cap_n), _tile(kd, cap_k)
    grid = (sorted_slots.shape[0] // block_m, triton.cdiv(n, block_n))
    atomic = not deterministic and k > 1
    if atomic:
        out = torch.zeros((t, n), dtype=torch.float32, device=dev)
    elif k == 1:
        out = torch.empty((t, n), dtype=out_dtype, device=dev)  # slot == token: every row stored once
    else:
        out = torch.empty((t * k, n), dtype=torch.float32, device=dev)  # every slot's row stored once
    _scatter_gemm_kernel[grid](
        inp, w, scale if scale is not None else inp, out, sorted_slots, block_expert, num_padded,
        t * k, k, kd, n, inp.stride(0), *w_strides, out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, HAS_SCALE=scale is not None, ATOMIC=atomic,
        **_launch_opts(dev),
    )
    if atomic:
        return out.to(out_dtype)
    if k == 1:
        return out
    res = torch.empty((t, n), dtype=out_dtype, device=dev)
    block_t = max(1, min(triton.next_power_of_2(t), 4096 // min(triton.next_power_of_2(n), 1024)))
    block_c = min(triton.next_power_of_2(n), 1024)
    _sum_slots_kernel[(triton.cdiv(t, block_t), triton.cdiv(n, block_c))](
        out, res, t, k, n, res.stride(0), BLOCK_T=block_t, BLOCK_N=block_c,
    )
    return res


def moe_experts_fwd(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    sorted_slots: torch.Tensor,
    block_expert: torch.Tensor,
    num_padded: torch.Tensor,
    block_m: int,
    *,
    deterministic: bool = False,
    save_h: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(y [T, D] in x's dtype, H [S_max, 2I] or None)``.

    ``sorted_slots``, ``block_expert``, ``num_padded`` come from ``moe_align(expert_ids, E, block_m)``.
    With ``save_h`` the pre-activations H are returned for :func:`moe_experts_bwd`. ``deterministic``
    replaces the scatter-add's atomics by per-slot rows summed in a fixed order.
    """
    _check_args("r1kernels.triton.moe.moe_experts_fwd", x, w13, w2, weights, sorted_slots, block_expert, num_padded, block_m)
    t, d = x.shape
    e, two_i, _ = w13.shape
    inter = two_i // 2
    k = weights.shape[1]
    s_max = sorted_slots.shape[0]
    dev = x.device
    h = torch.empty((s_max, two_i), dtype=x.dtype, device=dev) if save_h else None
    if t * k == 0 or d == 0 or inter == 0:  # nothing routed or empty matrices: y = 0 (no kernel for 0 programs)
        if h is not None:
            h.zero_()
        return torch.zeros((t, d), dtype=x.dtype, device=dev), h

    scale = weights.contiguous().view(-1)
    a = torch.empty((s_max, inter), dtype=x.dtype, device=dev)
    cap_n, cap_k = _caps(dev, x.dtype)
    block_n, block_k = _tile(inter, cap_n), _tile(d, cap_k)
    _gate_up_kernel[(s_max // block_m, triton.cdiv(inter, block_n))](
        x, w13, a, h if save_h else a, sorted_slots, block_expert, num_padded,
        t * k, k, d, inter,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        a.stride(0), h.stride(0) if save_h else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SAVE_H=save_h, **_launch_opts(dev),
    )
    # A @ W2_e^T: the reduced index is w2's last dim (I), the output columns its middle dim (D).
    y = _scatter(a, w2, (w2.stride(0), w2.stride(2), w2.stride(1)), scale, sorted_slots, block_expert, num_padded,
                 t, k, d, block_m, deterministic, x.dtype)
    return y, h


def expert_block_ranges(counts: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo [E], hi [E])`` int32: the row blocks ``[lo, hi)`` of each expert's run in ``moe_align``'s list
    (experts in ascending order, each run padded to BM, empty experts take no blocks). Device ops only."""
    blocks = (counts.to(torch.int64) + block_m - 1) // block_m
    hi = torch.cumsum(blocks, 0)
    return (hi - blocks).to(torch.int32), hi.to(torch.int32)


def moe_experts_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    h: torch.Tensor,
    sorted_slots: torch.Tensor,
    block_expert: torch.Tensor,
    num_padded: torch.Tensor,
    counts: torch.Tensor,
    block_m: int,
    *,
    deterministic: bool = False,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dx [T, D], dw13 [E, 2I, D], dw2 [E, D, I], dweights [T, K] fp32)``; an entry is None where ``needs``
    (for x, w13, w2, weights) is False.

    ``h`` is the forward's H (``moe_experts_fwd(..., save_h=True)``); ``counts`` the per-expert slot
    counts from the same ``moe_align`` call. Weight gradients are summed per expert by one program per
    output tile (deterministic always); dx uses atomics unless ``deterministic``.
    """
    fn = "r1kernels.triton.moe.moe_experts_bwd"
    _check_args(fn, x, w13, w2, weights, sorted_slots, block_expert, num_padded, block_m)
    t, d = x.shape
    e, two_i, _ = w13.shape
    inter = two_i // 2
    k = weights.shape[1]
    s_max = sorted_slots.shape[0]
    dev = x.device
    if tuple(dy.shape) != (t, d) or dy.device != dev or dy.dtype != x.dtype:
        raise ValueError(f"{fn}: dy must be {x.dtype} [{t}, {d}] on {dev}, got {dy.dtype} {tuple(dy.shape)} on {dy.device}")
    if h is None or tuple(h.shape) != (s_max, two_i) or h.dtype != x.dtype:
        raise ValueError(f"{fn}: h must be the forward's {x.dtype} [{s_max}, {two_i}] pre-activations (save_h=True)")
    if counts.shape != (e,) or counts.device != dev:
        raise ValueError(f"{fn}: counts must be [E={e}] on {dev}, got {tuple(counts.shape)} on {counts.device}")
    need_x, need_w13, need_w2, need_w = needs
    if t * k == 0 or d == 0 or inter == 0:  # y did not depend on anything: zero gradients
        return (torch.zeros_like(x) if need_x else None, torch.zeros_like(w13) if need_w13 else None,
                torch.zeros_like(w2) if need_w2 else None, torch.zeros_like(weights) if need_w else None)

    scale = weights.contiguous().view(-1)
    cap_n, cap_k = _caps(dev, x.dtype)
    opts = _launch_opts(dev)
    lo, hi = expert_block_ranges(counts, block_m)
    dx = dw13 = dw2 = dweights = None

    if need_x or need_w13 or need_w:
        block_n, block_k = _tile(inter, cap_n), _tile(d, cap_k)
        n_tiles = triton.cdiv(inter, block_n)
        dh = torch.empty((s_max, two_i), dtype=x.dtype, device=dev)
        dscale_part = torch.empty((n_tiles, t * k), dtype=torch.float32, device=dev)
        _down_bwd_kernel[(s_max // block_m, n_tiles)](
            dy, w2, h, scale, dh, dscale_part, sorted_slots, block_expert, num_padded,
            t * k, k, d, inter,
            dy.stride(0), dy.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), h.stride(0), dh.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **opts,
        )
        if need_w:
            # every slot sits in exactly one used block, so each I tile wrote every entry once
            dweights = (dscale_part[0] if n_tiles == 1 else dscale_part.sum(0)).view(t, k)
        if need_w13:
            block_n2, block_d = _tile(two_i, cap_n), _tile(d, cap_n)
            dw13 = torch.empty((e, two_i, d), dtype=w13.dtype, device=dev)
            _w13_grad_kernel[(e, triton.cdiv(two_i, block_n2), triton.cdiv(d, block_d))](
                x, dh, dw13, sorted_slots, lo, hi, t * k, k, d, two_i,
                x.stride(0), x.stride(1), dh.stride(0),
                BLOCK_M=block_m, BLOCK_N=block_n2, BLOCK_D=block_d, **opts,
            )
        if need_x:
            # dH @ W13_e: the reduced index is w13's middle dim (2I), the output columns its last dim (D).
            dx = _scatter(dh, w13, (w13.stride(0), w13.stride(1), w13.stride(2)), None, sorted_slots, block_expert,
                          num_padded, t, k, d, block_m, deterministic, x.dtype)

    if need_w2:
        block_d, block_i = _tile(d, cap_n), _tile(inter, cap_n)
        dw2 = torch.empty((e, d, inter), dtype=w2.dtype, device=dev)
        _w2_grad_kernel[(e, triton.cdiv(d, block_d), triton.cdiv(inter, block_i))](
            dy, h, scale, dw2, sorted_slots, lo, hi, t * k, k, d, inter,
            dy.stride(0), dy.stride(1), h.stride(0),
            BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_I=block_i, **opts,
        )
    return dx, dw13, dw2, dweights
