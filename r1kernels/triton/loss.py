"""Training losses in Triton: the row-wise part of the fused linear losses, and the GRPO element-wise loss.

Letters: R rows of one token chunk, V vocabulary, B sequences, S positions per sequence.

The fused linear losses (``r1kernels.ops.loss``) compute a chunk's logits ``[R, V]`` with a torch matmul and
hand them to a kernel here, which walks each row in blocks of ``BLOCK_V`` columns (so any V fits: two or
three passes over the row, nothing of V held at once), computes the row's logsumexp online in fp32, the
row's loss, and overwrites the logits in place with the gradient of the loss with respect to them (the
Liger-Kernel approach), ready for the two gradient matmuls. Small rows are packed ``BLOCK_R`` to a program.

Kernels:

* :func:`_xent_rows_kernel`: cross entropy / log-probability of a target column. Forward: the row's
  logsumexp of ``x * inv_temp`` and the target's log-probability; with ``WRITE_GRAD``, the gradient
  ``c_r (softmax_j - onehot_j)`` in place. Also the backward of the log-probabilities, given the logsumexp.
* :func:`_kd_rows_kernel`: forward KL, reverse KL or JSD between the student's row (in place: its
  gradient) and the teacher's.
* :func:`_grpo_kernel`: the GRPO per-token loss, its gradient and the metric sums, one pass.
* :func:`_scale_kernel`: multiplies a gradient computed in the forward by the upstream gradient, in place,
  and leaves memory untouched when that is exactly 1 (no host sync to find out).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import num_warps_for, tile_budget

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int64, torch.int32)
KD_KIND_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


@triton.jit
def _xent_rows_kernel(
    x_ptr,  # [R, V] logits (fp32 / fp16 / bf16), row stride stride_xr, columns contiguous; gradient out (WRITE_GRAD)
    tgt_ptr,  # [R] int target column per row, stride stride_t
    lse_ptr,  # [R] fp32: logsumexp_j(x_j * inv_temp), written (LSE_GIVEN False) or read (True), contiguous
    logp_ptr,  # [R] fp32 out (WRITE_LOGP): x_t * inv_temp - lse for kept rows, 0 for ignored rows, contiguous
    coef_ptr,  # gradient coefficient c_r at coef_ptr + r * stride_c (stride 0: one value for every row)
    R,  # rows
    V,  # columns
    stride_xr,
    stride_t,
    stride_c,
    coef_mul,  # multiplies c_r
    inv_temp,  # 1 / temperature
    ignore_index,  # rows whose target equals it get no loss and a zero gradient (when HAS_IGNORE)
    HAS_IGNORE: tl.constexpr,
    LSE_GIVEN: tl.constexpr,  # the backward of log-probabilities: lse comes from the forward
    WRITE_LOGP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,  # overwrite x with c_r * coef_mul * (softmax(x * inv_temp) - onehot(target))
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # columns per step of the walk along a row (a power of two)
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)  # R * V can pass 2^31
    row_base = x_ptr + rows64[:, None] * stride_xr  # [BLOCK_R, 1] pointers to the row starts
    tgt = tl.load(tgt_ptr + rows64 * stride_t, mask=row_ok, other=-1).to(tl.int64)  # padding rows match no column
    if HAS_IGNORE:
        keep = row_ok & (tgt != ignore_index)
    else:
        keep = row_ok

    if LSE_GIVEN:
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    else:
        # Online logsumexp: m the running max, s the sum of exp(x - m); xt picks the target's logit as the
        # walk passes it (a target outside [0, V) is never met, so nothing is read out of bounds).
        m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_R], dtype=tl.float32)
        xt = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = keep[:, None] & (cols < V)[None, :]  # ignored rows are not read
            x = tl.load(row_base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(x, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows of -inf only: keep exp() finite
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
            m = m_new
            xt += tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), axis=1)
        lse = m + tl.log(tl.where(s > 0, s, 1.0))  # a row of -inf only (or one not read): -inf
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        if WRITE_LOGP:
            tl.store(logp_ptr + rows, tl.where(keep, xt - lse, 0.0), mask=row_ok)

    if WRITE_GRAD:
        c = tl.load(coef_ptr + rows64 * stride_c, mask=row_ok, other=0.0).to(tl.float32) * coef_mul
        c = tl.where(keep, c, 0.0)  # ignored rows: a zero gradient row
        lse_use = tl.where(lse == float("-inf"), 0.0, lse)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            col_ok = (cols < V)[None, :]
            x = tl.load(row_base + cols[None, :], mask=keep[:, None] & col_ok, other=float("-inf")).to(tl.float32) * inv_temp
            p = tl.exp(x - lse_use[:, None])
            g = c[:, None] * (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0))
            # every row is written: ignored rows get a zero gradient without being read
            tl.store(row_base + cols[None, :], g.to(x_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok)


@triton.jit
def _kd_rows_kernel(
    s_ptr,  # [R, V] student logits (fp32 / fp16 / bf16), row stride stride_sr, columns contiguous; gradient out
    t_ptr,  # [R, V] teacher logits (any float dtype), row stride stride_tr, column stride stride_tv
    w_ptr,  # [R] fp32 row weights (mask / token count), stride stride_w
    loss_ptr,  # [R] fp32 out: w_r * loss_r, contiguous
    R,
    V,
    stride_sr,
    stride_tr,
    stride_tv,
    stride_w,
    inv_temp,  # 1 / temperature, applied to both the student and the teacher logits
    beta,  # JSD mixing weight of the teacher: m = beta t + (1 - beta) s
    KIND: tl.constexpr,  # 0 forward KL(t || s), 1 reverse KL(s || t), 2 JSD
    WRITE_GRAD: tl.constexpr,  # overwrite the student logits with w_r * d loss_r / d logits
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    s_base = s_ptr + rows64[:, None] * stride_sr
    t_base = t_ptr + rows64[:, None] * stride_tr
    w = tl.load(w_ptr + rows64 * stride_w, mask=row_ok, other=0.0)
    # Rows of weight 0 (masked tokens) are not read at all (they may hold anything) and give exactly 0.
    live = row_ok & (w != 0)

    # Pass 1: both rows' logsumexp, online (see _xent_rows_kernel).
    ms = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    mt = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    st = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = live[:, None] & (cols < V)[None, :]
        z = tl.load(s_base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        u = tl.load(t_base + cols[None, :] * stride_tv, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        ms_new = tl.maximum(ms, tl.max(z, axis=1))
        mt_new = tl.maximum(mt, tl.max(u, axis=1))
        ms_safe = tl.where(ms_new == float("-inf"), 0.0, ms_new)
        mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new)
        ss = ss * tl.exp(ms - ms_safe) + tl.sum(tl.exp(z - ms_safe[:, None]), axis=1)
        st = st * tl.exp(mt - mt_safe) + tl.sum(tl.exp(u - mt_safe[:, None]), axis=1)
        ms = ms_new
        mt = mt_new
    lse_s = tl.where(live, ms + tl.log(tl.where(ss > 0, ss, 1.0)), 0.0)  # rows not read (padding, weight 0): 0, no NaN below
    lse_t = tl.where(live, mt + tl.log(tl.where(st > 0, st, 1.0)), 0.0)

    # Pass 2: the row's loss (terms with probability 0 count 0: 0 log 0 = 0). Forward KL's gradient,
    # w (p_s - p_t) / temperature, needs nothing from this pass, so it is written here too.
    acc_t = tl.zeros([BLOCK_R], dtype=tl.float32)  # forward KL, or JSD's KL(t || m)
    acc_s = tl.zeros([BLOCK_R], dtype=tl.float32)  # reverse KL, or JSD's KL(s || m)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = live[:, None] & (cols < V)[None, :]
        # Columns past V read 0 and get probability 0 (finite values: no inf - inf to discard).
        z = tl.load(s_base + cols[None, :], mask=mask, other=0.0).to(tl.float32) * inv_temp
        u = tl.load(t_base + cols[None, :] * stride_tv, mask=mask, other=0.0).to(tl.float32) * inv_temp
        ls = z - lse_s[:, None]
        lt = u - lse_t[:, None]
        ps = tl.where(mask, tl.exp(ls), 0.0)
        pt = tl.where(mask, tl.exp(lt), 0.0)
        if KIND == 0:
            acc_t += tl.sum(tl.where(pt > 0, pt * (lt - ls), 0.0), axis=1)
            if WRITE_GRAD:
                g = tl.where(live[:, None], (w * inv_temp)[:, None] * (ps - pt), 0.0)
                # every row is written: rows not read get a zero gradient
                tl.store(s_base + cols[None, :], g.to(s_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < V)[None, :])
        elif KIND == 1:
            acc_s += tl.sum(tl.where(ps > 0, ps * (ls - lt), 0.0), axis=1)
        else:
            lm = tl.log(tl.where(mask, beta * pt + (1.0 - beta) * ps, 1.0))
            acc_t += tl.sum(tl.where((pt > 0) & (beta > 0), pt * (lt - lm), 0.0), axis=1)
            acc_s += tl.sum(tl.where((ps > 0) & (beta < 1), ps * (ls - lm), 0.0), axis=1)
    if KIND == 0:
        loss = acc_t
    elif KIND == 1:
        loss = acc_s
    else:
        loss = beta * acc_t + (1.0 - beta) * acc_s
    tl.store(loss_ptr + rows, tl.where(live, w * loss, 0.0), mask=row_ok)

    # Pass 3 (reverse KL, JSD): gradients that need the row's total. With z = logits / temperature,
    #   reverse KL: d/dz_j = p_s,j ((ls_j - lt_j) - KL(s || t));
    #   JSD:        d/dz_j = (1 - beta) p_s,j ((ls_j - lm_j) - KL(s || m)).
    if WRITE_GRAD and KIND != 0:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = live[:, None] & (cols < V)[None, :]
            z = tl.load(s_base + cols[None, :], mask=mask, other=0.0).to(tl.float32) * inv_temp
            u = tl.load(t_base + cols[None, :] * stride_tv, mask=mask, other=0.0).to(tl.float32) * inv_temp
            ls = z - lse_s[:, None]
            lt = u - lse_t[:, None]
            ps = tl.where(mask, tl.exp(ls), 0.0)
            if KIND == 1:
                d = ps * ((ls - lt) - acc_s[:, None])
                ok = live[:, None] & (ps > 0)
            else:
                lm = tl.log(tl.where(mask, beta * tl.exp(lt) + (1.0 - beta) * ps, 1.0))
                d = (1.0 - beta) * ps * ((ls - lm) - acc_s[:, None])
                ok = live[:, None] & (ps > 0) & (beta < 1)  # beta = 1: m = t, the student's term is gone
            g = tl.where(ok, (w * inv_temp)[:, None] * d, 0.0)
            tl.store(s_base + cols[None, :], g.to(s_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < V)[None, :])


@triton.jit
def _grpo_kernel(
    lp_ptr,  # [B, S] policy log-probs (float), strides stride_lb, stride_ls
    old_ptr,  # [B, S] sampling policy's log-probs, strides stride_ob, stride_os
    ref_ptr,  # [B, S] reference policy's log-probs (HAS_REF), strides stride_rb, stride_rs
    adv_ptr,  # advantages: element (b, s) at adv_ptr + b * stride_ab + s * stride_as ([B]: stride_as = 0)
    mask_ptr,  # [B, S] mask (uint8 view of a bool mask, or float weights), strides stride_mb, stride_ms
    scale_ptr,  # [B] fp32 per-sequence loss weight (the aggregation), stride stride_sc (0: one value)
    grad_ptr,  # [B, S] fp32 out (WRITE_GRAD): d loss / d logprobs, contiguous
    part_ptr,  # [3, B, NS] fp32 out: this program's sums of w * loss, w * kl, w * clipped
    B,
    S,
    NS,  # programs along S
    stride_lb, stride_ls,
    stride_ob, stride_os,
    stride_rb, stride_rs,
    stride_ab, stride_as,
    stride_mb, stride_ms,
    stride_sc,
    eps_low,  # ratio clipped below at 1 - eps_low
    eps_high,  # and above at 1 + eps_high
    beta,  # KL weight in the loss
    HAS_REF: tl.constexpr,  # ref log-probs given: kl computed (the metric), and added to the loss when KL_IN_LOSS
    KL_IN_LOSS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    sb = tl.program_id(1)
    pos = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    in_seq = pos < S
    b64 = b.to(tl.int64)
    w = tl.load(mask_ptr + b64 * stride_mb + pos * stride_ms, mask=in_seq, other=0).to(tl.float32)
    on = w != 0  # masked positions may hold anything (NaN, -inf): they are never used, only selected away
    lp = tl.load(lp_ptr + b64 * stride_lb + pos * stride_ls, mask=on, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + b64 * stride_ob + pos * stride_os, mask=on, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + b64 * stride_ab + pos * stride_as, mask=on, other=0.0).to(tl.float32)

    ratio = tl.exp(lp - old)
    clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    objective = tl.minimum(ratio * adv, clipped_ratio * adv)
    # The clipped term is the minimum (and differs) only past the clip range on the side A points to;
    # there the objective is constant in logprobs. Elsewhere d objective / d lp = d (ratio A) / d lp = ratio A.
    clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
    loss = -objective
    dloss = tl.where(clipped, 0.0, -ratio * adv)
    kl = tl.zeros([BLOCK_S], dtype=tl.float32)
    if HAS_REF:
        ref = tl.load(ref_ptr + b64 * stride_rb + pos * stride_rs, mask=on, other=0.0).to(tl.float32)
        e = tl.exp(ref - lp)
        kl = e - (ref - lp) - 1.0  # k3 estimator, >= 0
        if KL_IN_LOSS:
            loss += beta * kl
            dloss += beta * (1.0 - e)  # d kl / d lp = 1 - exp(ref - lp)

    scale = tl.load(scale_ptr + b64 * stride_sc)
    tw = w * scale  # the token's weight in the aggregated loss
    if WRITE_GRAD:
        tl.store(grad_ptr + b64 * S + pos, tl.where(on, tw * dloss, 0.0), mask=in_seq)
    part = b64 * NS + sb
    tl.store(part_ptr + part, tl.sum(tl.where(on, tw * loss, 0.0), axis=0))
    tl.store(part_ptr + B * NS + part, tl.sum(tl.where(on, w * kl, 0.0), axis=0))
    tl.store(part_ptr + 2 * B * NS + part, tl.sum(tl.where(on & clipped, w, 0.0), axis=0))


@triton.jit
def _scale_kernel(
    x_ptr,  # [N] contiguous gradient (fp32 / fp16 / bf16), scaled in place
    g_ptr,  # one element: the upstream gradient (any float dtype)
    N,
    BLOCK: tl.constexpr,
):
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:  # loss.backward() passes exactly 1: then nothing is read or written
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(x_ptr + offs, (x * g).to(x_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------------
# Launchers


def _fail(fn: str, msg: str, kind: type = ValueError):
    raise kind(f"r1kernels.triton.loss.{fn}: {msg}")


def _check_rows(fn: str, logits: torch.Tensor, **rows: Optional[torch.Tensor]) -> None:
    """The logits ``[R, V]`` with contiguous columns, and each ``[R]`` companion on the same device."""
    if logits.dtype not in _FLOATS:
        _fail(fn, f"logits must be float32 / float16 / bfloat16, got {logits.dtype}", TypeError)
    if logits.dim() != 2 or (logits.shape[1] > 1 and logits.stride(1) != 1):
        _fail(fn, f"logits must be [R, V] with contiguous columns, got shape {tuple(logits.shape)} strides {logits.stride()}")
    r = logits.shape[0]
    for name, t in rows.items():
        if t is None:
            continue
        if t.dim() not in (0, 1) or (t.dim() == 1 and t.shape[0] != r) or t.device != logits.device:
            _fail(fn, f"{name} must be [{r}] on {logits.device}, got {tuple(t.shape)} on {t.device}")


def _row_blocks(r: int, v: int, device: torch.device) -> tuple[int, int]:
    block_v = min(triton.next_power_of_2(max(v, 1)), tile_budget(device))
    block_r = max(1, min(triton.next_power_of_2(max(r, 1)), tile_budget(device) // block_v))
    return block_r, block_v


def _launch_xent(logits, targets, lse, logp, coef, coef_mul, inv_temp, ignore_index, lse_given, write_grad):
    r, v = logits.shape
    if r == 0:
        return
    block_r, block_v = _row_blocks(r, v, logits.device)
    coef_t = coef if coef is not None else lse  # never read unless WRITE_GRAD
    _xent_rows_kernel[(triton.cdiv(r, block_r),)](
        logits, targets, lse, logp if logp is not None else lse, coef_t,
        r, v, logits.stride(0), targets.stride(0), coef_t.stride(0) if coef_t.dim() == 1 else 0,
        float(coef_mul), float(inv_temp), int(ignore_index if ignore_index is not None else 0),
        HAS_IGNORE=ignore_index is not None, LSE_GIVEN=lse_given, WRITE_LOGP=logp is not None,
        WRITE_GRAD=write_grad, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps_for(block_r * block_v),
    )


def _check_f32(fn: str, **ts: torch.Tensor) -> None:
    for name, t in ts.items():
        if t.dtype != torch.float32 or (t.dim() == 1 and t.stride(0) != 1):
            _fail(fn, f"{name} must be a contiguous fp32 buffer, got {t.dtype} with strides {t.stride()}")


def ce_rows_(logits, labels, ignore_index: int, scale: torch.Tensor, logp_out: torch.Tensor, write_grad: bool) -> None:
    """Cross entropy of one token chunk.

    Args:
        logits: ``[R, V]`` (contiguous columns), overwritten when ``write_grad`` with the gradient of
            ``scale * sum of the kept rows' losses``: ``scale * (softmax - onehot(label))``, 0 on ignored rows.
        labels: ``[R]`` int64 / int32; ``ignore_index`` drops a row.
        scale: 0-d or ``[R]`` fp32 on the logits' device (``1 / kept tokens`` for a mean; read on the device).
        logp_out: ``[R]`` fp32 out: the label's log-probability, 0 for ignored rows.
    """
    _check_rows("ce_rows_", logits, labels=labels, scale=scale, logp_out=logp_out)
    if labels.dtype not in _INTS:
        _fail("ce_rows_", f"labels must be int64 / int32, got {labels.dtype}", TypeError)
    _check_f32("ce_rows_", logp_out=logp_out)
    lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _launch_xent(logits, labels, lse, logp_out, scale.float(), 1.0, 1.0, ignore_index, False, write_grad)


def logprob_rows(logits, tokens, inv_temp: float, logp_out: torch.Tensor, lse_out: torch.Tensor) -> None:
    """``logp_out[r] = logits[r, tokens[r]] * inv_temp - lse_out[r]``, ``lse_out[r] = logsumexp(logits[r] * inv_temp)``
    (both ``[R]`` fp32 out); the logits are left as they are."""
    _check_rows("logprob_rows", logits, tokens=tokens, logp_out=logp_out, lse_out=lse_out)
    if tokens.dtype not in _INTS:
        _fail("logprob_rows", f"tokens must be int64 / int32, got {tokens.dtype}", TypeError)
    _check_f32("logprob_rows", logp_out=logp_out, lse_out=lse_out)
    _launch_xent(logits, tokens, lse_out, logp_out, None, 1.0, inv_temp, None, False, False)


def logprob_grad_rows_(logits, tokens, inv_temp: float, lse: torch.Tensor, grad_logp: torch.Tensor) -> None:
    """The backward of :func:`logprob_rows`: overwrites the (recomputed) logits with
    ``grad_logp[r] * inv_temp * (onehot(tokens[r]) - softmax(logits[r] * inv_temp))``."""
    _check_rows("logprob_grad_rows_", logits, tokens=tokens, lse=lse, grad_logp=grad_logp)
    _check_f32("logprob_grad_rows_", lse=lse)
    _launch_xent(logits, tokens, lse, None, grad_logp, -float(inv_temp), inv_temp, None, True, True)


def kd_rows_(student, teacher, weights, kind: str, inv_temp: float, beta: float, loss_out, write_grad: bool) -> None:
    """Distillation loss of one token chunk (see ``r1kernels.reference.loss.kd_row_loss`` for the kinds).

    Args:
        student: ``[R, V]`` student logits (contiguous columns), overwritten when ``write_grad`` with
            ``weights[r] * d loss_r / d logits``.
        teacher: ``[R, V]`` teacher logits, any float dtype and strides.
        weights: ``[R]`` fp32 per-row weight; loss_out: ``[R]`` fp32 out, ``weights[r] * loss_r``.
    """
    _check_rows("kd_rows_", student, weights=weights, loss_out=loss_out)
    if teacher.shape != student.shape or teacher.device != student.device or teacher.dtype not in _FLOATS:
        _fail("kd_rows_", f"teacher must be float [{student.shape[0]}, {student.shape[1]}] on {student.device}, "
                          f"got {teacher.dtype} {tuple(teacher.shape)} on {teacher.device}")
    if kind not in KD_KIND_CODES:
        _fail("kd_rows_", f"kind must be one of {', '.join(KD_KIND_CODES)}, got {kind!r}")
    _check_f32("kd_rows_", loss_out=loss_out)
    r, v = student.shape
    if r == 0:
        return
    block_r, block_v = _row_blocks(r, v, student.device)
    _kd_rows_kernel[(triton.cdiv(r, block_r),)](
        student, teacher, weights, loss_out, r, v,
        student.stride(0), teacher.stride(0), teacher.stride(1), weights.stride(0),
        float(inv_temp), float(beta),
        KIND=KD_KIND_CODES[kind], WRITE_GRAD=write_grad, BLOCK_R=block_r, BLOCK_V=block_v,
        num_warps=num_warps_for(block_r * block_v),
    )


def grpo_fwd_bwd(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    seq_scale: torch.Tensor,
    epsilon: float,
    epsilon_high: float,
    beta: float,
    kl_in_loss: bool,
    write_grad: bool,
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """One pass over ``[B, S]``: ``(grad, partials)``.

    ``grad`` ``[B, S]`` fp32 (None unless ``write_grad``): d loss / d logprobs for an upstream gradient of 1.
    ``partials`` ``[3, B, NS]`` fp32: per program, the sums of ``w scale_b loss_token``, ``w kl`` and
    ``w clipped`` (w the mask's value); the loss is ``partials[0].sum()``. ``seq_scale`` ``[B]`` fp32 (any
    stride, 0 to broadcast one value) weights each sequence's tokens (the aggregation). All other tensors
    ``[B, S]`` with any strides (``advantages`` ``[B]`` or ``[B, S]``); ``mask`` bool or float.
    """
    fn = "grpo_fwd_bwd"
    if logprobs.dim() != 2:
        _fail(fn, f"logprobs must be [B, S], got {tuple(logprobs.shape)}")
    b, s = logprobs.shape
    for name, t in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("mask", mask)):
        if t is not None and (t.shape != (b, s) or t.device != logprobs.device):
            _fail(fn, f"{name} must be [{b}, {s}] on {logprobs.device}, got {tuple(t.shape)} on {t.device}")
    if advantages.shape not in ((b,), (b, s)):
        _fail(fn, f"advantages must be [{b}] or [{b}, {s}], got {tuple(advantages.shape)}")
    if seq_scale.dtype != torch.float32 or seq_scale.shape != (b,):
        _fail(fn, f"seq_scale must be fp32 [{b}], got {seq_scale.dtype} {tuple(seq_scale.shape)}")
    dev = logprobs.device
    block_s = min(triton.next_power_of_2(max(s, 1)), 1024 if dev.type == "cuda" else tile_budget(dev))
    ns = triton.cdiv(s, block_s)
    part = torch.zeros((3, b, ns), dtype=torch.float32, device=dev)
    grad = torch.empty((b, s), dtype=torch.float32, device=dev) if write_grad else None
    if b == 0 or s == 0:
        return (grad, part)
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask  # same bytes, a type Triton loads
    ref = ref_logprobs if ref_logprobs is not None else logprobs  # never read without HAS_REF
    a_b, a_s = (advantages.stride(0), 0) if advantages.dim() == 1 else advantages.stride()
    _grpo_kernel[(b, ns)](
        logprobs, old_logprobs, ref, advantages, m, seq_scale, grad if grad is not None else part, part,
        b, s, ns,
        logprobs.stride(0), logprobs.stride(1), old_logprobs.stride(0), old_logprobs.stride(1),
        ref.stride(0), ref.stride(1), a_b, a_s, m.stride(0), m.stride(1), seq_scale.stride(0),
        float(epsilon), float(epsilon_high), float(beta),
        HAS_REF=ref_logprobs is not None, KL_IN_LOSS=kl_in_loss and ref_logprobs is not None,
        WRITE_GRAD=write_grad, BLOCK_S=block_s, num_warps=num_warps_for(block_s),
    )
    return grad, part


def scale_(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x *= g`` in place for a contiguous float ``x`` and a one-element ``g`` read on the device; when ``g``
    is exactly 1 the kernel touches nothing. Returns ``x``."""
    if not x.is_contiguous() or x.dtype not in _FLOATS:
        _fail("scale_", f"x must be a contiguous float tensor, got {x.dtype} with strides {x.stride()}")
    if g.numel() != 1 or g.device != x.device:
        _fail("scale_", f"g must hold one element on {x.device}, got {tuple(g.shape)} on {g.device}")
    n = x.numel()
    if n == 0:
        return x
    block = min(triton.next_power_of_2(n), tile_budget(x.device))
    _scale_kernel[(triton.cdiv(n, block),)](x, g, n, BLOCK=block, num_warps=num_warps_for(block))
    return x
