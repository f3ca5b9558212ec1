"""RMSNorm in Triton: forward (saves 1/rms per row) and backward (dx per row, dweight reduced without atomics).

Letters: N rows (all leading dims of x merged), D the normalised (last) dim. A whole row is one tile
(``BLOCK_D = next_power_of_2(D)``); small rows are packed ``BLOCK_N`` to a program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import num_warps_for, persistent_programs, rows_2d, tile_budget

# A row is held in one tile; rows longer than this are not supported by these kernels (ops' check says so,
# and auto dispatch then uses another backend). DeepSeek-V3's widest norm is 7168.
MAX_D = 65536
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # [N, D] input (fp32 / fp16 / bf16), row stride stride_xn, column stride stride_xd
    w_ptr,  # [D] weight (fp32 / fp16 / bf16), stride stride_w
    y_ptr,  # [N, D] output in x's dtype, row stride stride_yn, columns contiguous
    rstd_ptr,  # [N] fp32 output: 1 / sqrt(mean(x^2) + eps), kept for the backward
    N,  # rows
    D,  # columns (the normalised dim)
    stride_xn,
    stride_xd,
    stride_w,
    stride_yn,
    eps,  # added to the mean square
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # power of two >= D: one tile holds whole rows
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < N
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)  # row offsets can pass 2^31 elements

    # Masked lanes read 0, so they add nothing to the sum of squares.
    x = tl.load(x_ptr + rows64[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)

    mean_sq = tl.sum(x * x, axis=1) / D  # [BLOCK_N], fp32
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    y = x * rstd[:, None] * w[None, :]  # one rounding, at the store

    tl.store(y_ptr + rows64[:, None] * stride_yn + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # [N, D] gradient of the output, any row / column strides
    x_ptr,  # [N, D] forward input, any row / column strides
    w_ptr,  # [D] weight, stride stride_w
    rstd_ptr,  # [N] fp32, from the forward
    dx_ptr,  # [N, D] output in x's dtype, row stride stride_dxn, columns contiguous
    dw_part_ptr,  # [programs, D] fp32 output: this program's share of dweight (row pid)
    N,
    D,
    stride_dyn,
    stride_dyd,
    stride_xn,
    stride_xd,
    stride_w,
    stride_dxn,
    rows_per_program,  # a multiple of BLOCK_N; program pid owns rows [pid * rows_per_program, +rows_per_program)
    BLOCK_N: tl.constexpr,  # rows per loop step
    BLOCK_D: tl.constexpr,  # power of two >= D
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    w = tl.load(w_ptr + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)  # summed over rows once, at the end

    row_start = pid * rows_per_program
    for step in range(0, rows_per_program, BLOCK_N):
        rows = row_start + step + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)

        x = tl.load(x_ptr + rows64[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dyn + cols[None, :] * stride_dyd, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)

        # With g = dy * w:  dx = rstd * g - x * rstd^3 * mean(g * x)
        g = dy * w[None, :]
        mean_gx = tl.sum(g * x, axis=1) / D
        dx = rstd[:, None] * g - x * (rstd * rstd * rstd * mean_gx)[:, None]
        tl.store(dx_ptr + rows64[:, None] * stride_dxn + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)

        # dweight = sum over rows of dy * x * rstd; masked rows and columns contribute 0.
        dw_acc += dy * x * rstd[:, None]

    tl.store(dw_part_ptr + pid.to(tl.int64) * D + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


def _check(fn: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype not in _FLOATS:
        raise TypeError(f"r1kernels.triton.norm.{fn}: x must be float32 / float16 / bfloat16, got {x.dtype}")
    if weight.dtype not in _FLOATS:
        raise TypeError(f"r1kernels.triton.norm.{fn}: weight must be float32 / float16 / bfloat16, got {weight.dtype}")
    if x.dim() == 0 or weight.shape != (x.shape[-1],):
        raise ValueError(
            f"r1kernels.triton.norm.{fn}: weight must have shape [D] with D = x.shape[-1]; "
            f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if weight.device != x.device:
        raise ValueError(f"r1kernels.triton.norm.{fn}: weight is on {weight.device}, x on {x.device}")
    if x.shape[-1] > MAX_D:
        raise ValueError(f"r1kernels.triton.norm.{fn}: rows of {x.shape[-1]} elements exceed the one-tile limit of {MAX_D}")


def _blocks(n: int, d: int, device: torch.device) -> tuple[int, int]:
    block_d = triton.next_power_of_2(d)
    block_n = max(1, min(triton.next_power_of_2(n), tile_budget(device) // block_d))
    return block_n, block_d


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)``: y ``[..., D]`` in ``x.dtype`` (contiguous) and rstd ``[N]`` fp32 for :func:`rms_norm_bwd`."""
    _check("rms_norm_fwd", x, weight)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y, torch.empty(x.shape[:-1].numel(), dtype=torch.float32, device=x.device)
    x2 = rows_2d(x)
    n, d = x2.shape
    y2 = y.view(n, d)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    block_n, block_d = _blocks(n, d, x.device)
    _rms_norm_fwd_kernel[(triton.cdiv(n, block_n),)](
        x2, weight, y2, rstd, n, d,
        x2.stride(0), x2.stride(1), weight.stride(0), y2.stride(0), float(eps),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps_for(block_n * block_d),
    )
    return y, rstd


def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx [..., D] in x.dtype, dweight [D] in weight.dtype)`` from the forward's ``rstd``.

    dweight is reduced deterministically: each program writes its partial sum to its own row of an fp32
    ``[programs, D]`` buffer, which is then summed over programs (no atomics).
    """
    _check("rms_norm_bwd", x, weight)
    if dy.shape != x.shape or dy.device != x.device:
        raise ValueError(f"r1kernels.triton.norm.rms_norm_bwd: dy must match x ({tuple(x.shape)}, {x.device}), got {tuple(dy.shape)} on {dy.device}")
    if rstd.dtype != torch.float32 or rstd.shape != (x.shape[:-1].numel(),):
        raise ValueError(f"r1kernels.triton.norm.rms_norm_bwd: rstd must be fp32 [{x.shape[:-1].numel()}], got {rstd.dtype} {tuple(rstd.shape)}")
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return dx, torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    x2, dy2 = rows_2d(x), rows_2d(dy)
    n, d = x2.shape
    dx2 = dx.view(n, d)
    block_n, block_d = _blocks(n, d, x.device)
    programs = max(1, min(triton.cdiv(n, block_n), persistent_programs(x.device)))
    rows_per_program = triton.cdiv(triton.cdiv(n, programs), block_n) * block_n
    programs = triton.cdiv(n, rows_per_program)  # none left idle
    dw_part = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy2, x2, weight, rstd, dx2, dw_part, n, d,
        dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), weight.stride(0), dx2.stride(0),
        rows_per_program,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps_for(block_n * block_d),
    )
    return dx, dw_part.sum(0).to(weight.dtype)
