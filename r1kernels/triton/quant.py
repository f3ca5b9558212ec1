"""FP8 block dequantisation in Triton: ``out[n, k] = weight[n, k] * scale_inv[n // B, k // B]``.

Letters: N rows, K columns, B the quantisation block edge (any positive int; 128 in DeepSeek-V3). The
output tile (``BLOCK_M`` x ``BLOCK_K``) is independent of B: each element looks up its block's scale.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import num_warps_for, tile_budget

_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.float32, torch.float16, torch.bfloat16)
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _fp8_block_dequant_kernel(
    w_ptr,  # [N, K] weight: fp8 e4m3 (or fp32 / fp16 / bf16), any strides
    s_ptr,  # [ceil(N / B), ceil(K / B)] fp32 block multipliers, any strides
    out_ptr,  # [N, K] output (fp32 / fp16 / bf16), row stride stride_on, columns contiguous
    N,
    K,
    stride_wn, stride_wk,
    stride_sn, stride_sk,
    stride_on,
    QBLOCK,  # B, the quantisation block edge
    BLOCK_M: tl.constexpr,  # output rows per program
    BLOCK_K: tl.constexpr,  # output columns per program
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < N)[:, None] & (cols < K)[None, :]

    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=mask, other=0.0).to(tl.float32)
    # The partial last block row / column needs no special case: its indices are still n // B, k // B.
    s_off = (rows // QBLOCK)[:, None] * stride_sn + (cols // QBLOCK)[None, :] * stride_sk
    s = tl.load(s_ptr + s_off, mask=mask, other=0.0)
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :], (w * s).to(out_ptr.dtype.element_ty), mask=mask)


def fp8_block_dequant(
    weight: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``[N, K]`` ``out_dtype``: weight times its block's scale, computed in fp32 (one rounding)."""
    fn = "r1kernels.triton.quant.fp8_block_dequant"
    if weight.dtype not in _WEIGHT_DTYPES or weight.dim() != 2:
        raise TypeError(f"{fn}: weight must be a 2-D float8_e4m3fn / float32 / float16 / bfloat16 tensor, got {weight.dtype} {tuple(weight.shape)}")
    if block_size < 1:
        raise ValueError(f"{fn}: block_size must be positive, got {block_size}")
    n, k = weight.shape
    want = (math.ceil(n / block_size), math.ceil(k / block_size))
    if scale_inv.dtype != torch.float32 or tuple(scale_inv.shape) != want or scale_inv.device != weight.device:
        raise ValueError(
            f"{fn}: scale_inv must be float32 {list(want)} on {weight.device}, "
            f"got {scale_inv.dtype} {tuple(scale_inv.shape)} on {scale_inv.device}"
        )
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"{fn}: out_dtype must be float32 / float16 / bfloat16, got {out_dtype}")
    out = torch.empty((n, k), dtype=out_dtype, device=weight.device)
    if out.numel() == 0:
        return out
    block_k = min(triton.next_power_of_2(k), 256)
    block_m = max(1, min(triton.next_power_of_2(n), tile_budget(weight.device) // block_k))
    grid = (triton.cdiv(n, block_m), triton.cdiv(k, block_k))
    _fp8_block_dequant_kernel[grid](
        weight, scale_inv, out, n, k,
        weight.stride(0), weight.stride(1), scale_inv.stride(0), scale_inv.stride(1), out.stride(0),
        int(block_size),
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps_for(block_m * block_k),
    )
    return out
