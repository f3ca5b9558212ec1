"""Rotary position embedding in Triton, both channel layouts, forward and inverse rotation.

Letters: B batch, S sequence (or T tokens with B = 1), H heads, D rotary channels, P = D / 2 pairs.
A "row" is one (b, s, h) vector of D channels; a program rotates ``BLOCK_R`` rows of ``BLOCK_P`` pairs.
The backward of a rotation is the inverse rotation: the same kernel with sin negated (``INVERSE``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import num_warps_for, tile_budget

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rope_kernel(
    x_ptr,  # [B, S, H, D] input (fp32 / fp16 / bf16), any strides
    cos_ptr,  # [B, S, P] fp32 (stride_cb = 0 when shared by the batch)
    sin_ptr,  # [B, S, P] fp32, its own strides
    out_ptr,  # [B, S, H, D] output in x's dtype, any strides
    n_rows,  # B * S * H
    S,
    H,
    P,  # pairs per row
    stride_xb, stride_xs, stride_xh, stride_xd,
    stride_cb, stride_cs, stride_cp,
    stride_sb, stride_ss, stride_sp,
    stride_ob, stride_os, stride_oh, stride_od,
    INTERLEAVED: tl.constexpr,  # pairs are channels (2i, 2i+1) if True, (i, i + P) if False
    INVERSE: tl.constexpr,  # rotate by -angle (the backward): sin is negated
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_P: tl.constexpr,  # power of two >= P
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    pairs = tl.arange(0, BLOCK_P)
    row_mask = rows < n_rows
    pair_mask = pairs < P
    mask = row_mask[:, None] & pair_mask[None, :]

    # row -> (b, s, h)
    h = rows % H
    bs = rows // H
    s = bs % S
    b = bs // S

    # The two channels of each pair.
    if INTERLEAVED:
        c1 = 2 * pairs
        c2 = 2 * pairs + 1
    else:
        c1 = pairs
        c2 = pairs + P

    x_row = b * stride_xb + s * stride_xs + h * stride_xh  # [BLOCK_R]
    x1 = tl.load(x_ptr + x_row[:, None] + c1[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_row[:, None] + c2[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + (b * stride_cb + s * stride_cs)[:, None] + pairs[None, :] * stride_cp, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + (b * stride_sb + s * stride_ss)[:, None] + pairs[None, :] * stride_sp, mask=mask, other=0.0)
    if INVERSE:
        sin = -sin

    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin

    o_row = b * stride_ob + s * stride_os + h * stride_oh
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + o_row[:, None] + c1[None, :] * stride_od, o1.to(out_ty), mask=mask)
    tl.store(out_ptr + o_row[:, None] + c2[None, :] * stride_od, o2.to(out_ty), mask=mask)


def _as_4d(x: torch.Tensor, cos: torch.Tensor, name: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """x as [B, S, H, D] (a view) and the (b, s, p) strides of cos / sin (b stride 0 when broadcast)."""
    xb = x.unsqueeze(0) if x.dim() == 3 else x
    _, s, _, d = xb.shape
    p = d // 2
    if cos.dim() == 3 and tuple(cos.shape) == (xb.shape[0], s, p) and x.dim() == 4:
        return xb, (cos.stride(0), cos.stride(1), cos.stride(2))
    if cos.dim() == 2 and tuple(cos.shape) == (s, p):
        return xb, (0, cos.stride(0), cos.stride(1))
    want = f"[{x.shape[0]}, {p}]" if x.dim() == 3 else f"[{x.shape[0]}, {s}, {p}] or [{s}, {p}]"
    raise ValueError(f"r1kernels.triton.rope.apply_rope: {name} must have shape {want} for x {tuple(x.shape)}, got {tuple(cos.shape)}")


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True, inverse: bool = False
) -> torch.Tensor:
    """Rotate ``x`` (``[T, H, D]`` or ``[B, S, H, D]``, any strides) by the angles of ``cos`` / ``sin``
    (fp32, ``[T, P]``, ``[B, S, P]`` or ``[S, P]``); ``inverse`` rotates by minus the angle (the backward).
    Returns a contiguous tensor of x's shape and dtype."""
    if x.dtype not in _FLOATS:
        raise TypeError(f"r1kernels.triton.rope.apply_rope: x must be float32 / float16 / bfloat16, got {x.dtype}")
    if x.dim() not in (3, 4) or x.shape[-1] % 2:
        raise ValueError(f"r1kernels.triton.rope.apply_rope: x must be [T, H, D] or [B, S, H, D] with D even, got {tuple(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32:
            raise TypeError(f"r1kernels.triton.rope.apply_rope: {name} must be float32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"r1kernels.triton.rope.apply_rope: {name} is on {t.device}, x on {x.device}")
    x4, cs = _as_4d(x, cos, "cos")
    _, ss = _as_4d(x, sin, "sin")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    out4 = out.unsqueeze(0) if x.dim() == 3 else out
    b, s, h, d = x4.shape
    p = d // 2
    n_rows = b * s * h
    block_p = triton.next_power_of_2(p)
    block_r = max(1, min(triton.next_power_of_2(n_rows), tile_budget(x.device) // block_p))
    _rope_kernel[(triton.cdiv(n_rows, block_r),)](
        x4, cos, sin, out4, n_rows, s, h, p,
        *x4.stride(), *cs, *ss, *out4.stride(),
        INTERLEAVED=bool(interleaved), INVERSE=bool(inverse), BLOCK_R=block_r, BLOCK_P=block_p,
        num_warps=num_warps_for(block_r * block_p),
    )
    return out
