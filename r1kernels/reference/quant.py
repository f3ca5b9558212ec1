"""FP8 block dequantisation reference (DeepSeek-V3 checkpoints).

Letters: N output rows, K input columns, B the block edge (128 in DeepSeek-V3's checkpoints).
"""
from __future__ import annotations

import torch


def fp8_block_dequant(
    weight: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``weight[n, k] * scale_inv[n // B, k // B]`` in fp32, returned as ``out_dtype``.

    Args:
        weight: ``[N, K]`` ``torch.float8_e4m3fn`` (any 2-D float dtype is accepted, for tests).
        scale_inv: ``[ceil(N / B), ceil(K / B)]`` fp32: the multiplier of each B x B block (the last row
            and column of blocks may be partial).
        block_size: B.
        out_dtype: dtype of the result.
    Returns:
        ``[N, K]`` ``out_dtype``.
    """
    n, k = weight.shape
    s = scale_inv.float().repeat_interleave(block_size, 0)[:n].repeat_interleave(block_size, 1)[:, :k]  # [N, K]
    return (weight.float() * s).to(out_dtype)
