"""Rotary position embedding reference, with YaRN frequency scaling.

Letters: T tokens (or B, S batch and sequence), H heads, D the rotary dim (even), P = D / 2 pairs.

Layouts of the D rotary channels:
* interleaved (DeepSeek's checkpoints, ``rope_interleave``): pair i is channels (2i, 2i+1);
* half-split (GPT-NeoX / Llama): pair i is channels (i, i + P).
Pair i is rotated by angle ``position * inv_freq[i]``; the output keeps the input's layout.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(
    dim: int,
    base: float,
    *,
    scaling_type: Optional[str] = None,
    factor: float = 1.0,
    original_max_position_embeddings: Optional[int] = None,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    mscale: Optional[float] = None,
    mscale_all_dim: Optional[float] = None,
    attention_factor: Optional[float] = None,
    truncate: bool = True,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[D/2]`` (fp32) and the factor that multiplies cos and sin.

    ``scaling_type`` None / ``"default"``: plain RoPE, factor 1.
    ``"yarn"`` (arXiv 2309.00071, as DeepSeek-V2/V3 use it): pairs rotating fewer than ``beta_slow`` times over
    the original context are interpolated (divided by ``factor``), pairs rotating more than ``beta_fast``
    times are kept, a linear ramp blends between. cos/sin are scaled by ``attention_factor``, which defaults
    to ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are given, else
    ``mscale(factor)`` (transformers' rule). The softmax-scale correction ``mscale(factor, mscale_all_dim)^2``
    is separate: see ``ModelConfig.softmax_scale``.
    """
    if dim % 2:
        raise ValueError(f"rope_inv_freq: dim must be even, got {dim}")
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [P]
    if scaling_type in (None, "default"):
        return 1.0 / pos_freqs, 1.0
    if scaling_type != "yarn":
        raise ValueError(f"rope_inv_freq: unsupported rope scaling type {scaling_type!r} (supported: default, yarn)")
    if original_max_position_embeddings is None:
        raise ValueError("rope_inv_freq: yarn needs original_max_position_embeddings")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        # the channel index whose wavelength fits `num_rotations` times into the original context
        return (dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)  # [P]
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``positions[..., None] * inv_freq``, times ``attention_factor``.

    Args:
        positions: ``[...]`` integer positions (any shape, e.g. ``[B, S]`` or ``[T]``).
        inv_freq: ``[P]`` fp32.
    Returns:
        ``(cos, sin)``, each ``[..., P]`` fp32.
    """
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(device=positions.device, dtype=torch.float32)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate the D channels of ``x`` pairwise.

    Args:
        x: ``[T, H, D]`` or ``[B, S, H, D]``; fp32 / fp16 / bf16; any strides.
        cos, sin: ``[T, P]`` / ``[B, S, P]`` (or ``[S, P]``, broadcast over B), fp32.
        interleaved: pairs are (2i, 2i+1) when True, (i, i+P) when False.
    Returns:
        Same shape and dtype as ``x``, same channel layout; computed in fp32.
    """
    xf = x.float()
    c, s = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)  # [..., 1, P], broadcast over heads
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)  # [..., H, P, 2] -> [..., H, D]
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.to(x.dtype)
