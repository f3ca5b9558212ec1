"""Public FP8 block-dequantisation op (DeepSeek-V3 checkpoints store e4m3 weights with a 128x128 block scale)."""
from __future__ import annotations

import math

import torch

from .. import reference
from .._dispatch import Impl, Op, always, triton_check
from ._validate import check_tensor


def _fp8_block_dequant_triton(
    weight: torch.Tensor, scale_inv: torch.Tensor, block_size: int, out_dtype: torch.dtype
) -> torch.Tensor:
    from ..triton.quant import fp8_block_dequant as launch

    return launch(weight, scale_inv, block_size, out_dtype)


FP8_BLOCK_DEQUANT = Op("fp8_block_dequant", {
    "reference": Impl(reference.fp8_block_dequant, always),
    "triton": Impl(_fp8_block_dequant_triton, triton_check),
})


def fp8_block_dequant(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: int = 128,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``weight[n, k] * scale_inv[n // block_size, k // block_size]`` as ``out_dtype``.

    Args:
        weight: ``[N, K]`` ``float8_e4m3fn`` (fp32 / fp16 / bf16 also accepted).
        scale_inv: ``[ceil(N / block_size), ceil(K / block_size)]`` fp32, on weight's device.
        block_size: edge of the square quantisation block (128 in DeepSeek-V3).
        out_dtype: fp32 / fp16 / bf16.
    Returns:
        ``[N, K]`` ``out_dtype``. Not differentiable (checkpoint loading only).
    """
    check_tensor(
        "fp8_block_dequant", "weight", weight, ndim=2,
        dtypes=(torch.float8_e4m3fn, torch.float32, torch.float16, torch.bfloat16),
    )
    n, k = weight.shape
    want = (math.ceil(n / block_size), math.ceil(k / block_size))
    check_tensor("fp8_block_dequant", "scale_inv", scale_inv, shape=want, dtypes=(torch.float32,), device=weight.device)
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"r1kernels.ops.fp8_block_dequant: out_dtype must be float32 / float16 / bfloat16, got {out_dtype}")
    return FP8_BLOCK_DEQUANT(backend, weight, scale_inv, int(block_size), out_dtype)
