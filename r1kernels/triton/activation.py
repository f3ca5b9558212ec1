"""SwiGLU in Triton: y = silu(gate) * up, and its backward, fused element-wise kernels.

Letters: N rows (leading dims merged), I the intermediate (last) dim. gate and up carry their own row and
column strides, so the two halves of a fused ``[..., 2I]`` projection are read in place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import num_warps_for, rows_2d, tile_budget

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _swiglu_fwd_kernel(
    g_ptr,  # [N, I] gate (fp32 / fp16 / bf16), any strides
    u_ptr,  # [N, I] up, same dtype, any strides
    y_ptr,  # [N, I] output in gate's dtype, row stride stride_yn, columns contiguous
    N,
    I,
    stride_gn, stride_gi,
    stride_un, stride_ui,
    stride_yn,
    BLOCK_N: tl.constexpr,  # rows per program (axis 0 of the grid)
    BLOCK_I: tl.constexpr,  # columns per program (axis 1 of the grid)
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < N)[:, None] & (cols < I)[None, :]

    g = tl.load(g_ptr + rows[:, None] * stride_gn + cols[None, :] * stride_gi, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * stride_un + cols[None, :] * stride_ui, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u  # silu(g) * u in fp32
    tl.store(y_ptr + rows[:, None] * stride_yn + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr,  # [N, I] gradient of the output, any strides
    g_ptr,  # [N, I] gate, any strides
    u_ptr,  # [N, I] up, any strides
    dg_ptr,  # [N, I] output: dgate in gate's dtype, row stride stride_dn, columns contiguous
    du_ptr,  # [N, I] output: dup in up's dtype, same layout as dg
    N,
    I,
    stride_dyn, stride_dyi,
    stride_gn, stride_gi,
    stride_un, stride_ui,
    stride_dn,
    BLOCK_N: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < N)[:, None] & (cols < I)[None, :]

    dy = tl.load(dy_ptr + rows[:, None] * stride_dyn + cols[None, :] * stride_dyi, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows[:, None] * stride_gn + cols[None, :] * stride_gi, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * stride_un + cols[None, :] * stride_ui, mask=mask, other=0.0).to(tl.float32)

    sig = tl.sigmoid(g)
    silu = g * sig
    dgate = dy * u * sig * (1.0 + g * (1.0 - sig))  # d silu(g) / dg = s * (1 + g * (1 - s))
    dup = dy * silu

    out = rows[:, None] * stride_dn + cols[None, :]
    tl.store(dg_ptr + out, dgate.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + out, dup.to(du_ptr.dtype.element_ty), mask=mask)


def _check(fn: str, **tensors: torch.Tensor) -> torch.Tensor:
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t.dtype not in _FLOATS:
            raise TypeError(f"r1kernels.triton.activation.{fn}: {name} must be float32 / float16 / bfloat16, got {t.dtype}")
        if t.shape != first.shape or t.device != first.device:
            raise ValueError(
                f"r1kernels.triton.activation.{fn}: {name} must match {first_name} "
                f"({tuple(first.shape)} on {first.device}), got {tuple(t.shape)} on {t.device}"
            )
    return first


def _grid(n: int, i: int, device: torch.device) -> tuple[int, int, tuple[int, int]]:
    block_i = min(triton.next_power_of_2(i), 1024)
    block_n = max(1, min(triton.next_power_of_2(n), tile_budget(device) // block_i))
    return block_n, block_i, (triton.cdiv(n, block_n), triton.cdiv(i, block_i))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, 1) if t.dim() == 0 else rows_2d(t)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in gate's dtype, contiguous, shaped like gate."""
    _check("swiglu_fwd", gate=gate, up=up)
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel() == 0:
        return y
    g2, u2, y2 = _rows(gate), _rows(up), _rows(y)
    n, i = g2.shape
    block_n, block_i, grid = _grid(n, i, gate.device)
    _swiglu_fwd_kernel[grid](
        g2, u2, y2, n, i,
        g2.stride(0), g2.stride(1), u2.stride(0), u2.stride(1), y2.stride(0),
        BLOCK_N=block_n, BLOCK_I=block_i, num_warps=num_warps_for(block_n * block_i),
    )
    return y


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)`` in the input dtypes, contiguous, shaped like gate."""
    _check("swiglu_bwd", gate=gate, up=up, dy=dy)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if gate.numel() == 0:
        return dgate, dup
    dy2, g2, u2, dg2, du2 = _rows(dy), _rows(gate), _rows(up), _rows(dgate), _rows(dup)
    n, i = g2.shape
    block_n, block_i, grid = _grid(n, i, gate.device)
    _swiglu_bwd_kernel[grid](
        dy2, g2, u2, dg2, du2, n, i,
        dy2.stride(0), dy2.stride(1), g2.stride(0), g2.stride(1), u2.stride(0), u2.stride(1), dg2.stride(0),
        BLOCK_N=block_n, BLOCK_I=block_i, num_warps=num_warps_for(block_n * block_i),
    )
    return dgate, dup
