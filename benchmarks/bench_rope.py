"""Rotary embedding at MLA's shapes (``r1kernels.ops.apply_rope``, interleaved pairs, DeepSeek's layout).

Shapes: :func:`benchmarks.shapes.rope_shapes`: q_pe [T, 128, 64] (the rotary slice of each 192-wide query
head) and k_pe [T, 1, 64] (the slice of the 576-wide kv_a output), at the run's token counts; cos / sin are
fp32 [T, 32] with DeepSeek-V3's YaRN frequencies. Passes: ``fwd`` and ``fwd+bwd`` (the gradient of x for a
random upstream gradient: the inverse rotation).

Formulas, with T tokens, H heads, D = 64 rotary channels, s the bytes per element of x:

* FLOP, fwd: 3 T H D (per pair of channels 4 multiplies and 2 adds); fwd+bwd: 6 T H D.
* bytes, fwd: read x, write the output, read cos and sin (fp32, T x D/2 each) = 2 T H D s + 4 T D.
* bytes, fwd+bwd: the forward's, then read dy, write dx, read cos and sin again = 4 T H D s + 8 T D.

Compared: two torch baselines, "torch complex" (DeepSeek-V3's own ``apply_rotary_emb``:
``view_as_complex`` times precomputed ``freqs_cis``) and "torch real" (even / odd channels, rotate,
stack); the r1kernels backends of the device. No peer: the libraries that ship a RoPE kernel
(Liger-Kernel, flash-attn) rotate half-split (NeoX) pairs of a [B, H, S, D] q and k together, a different
computation from DeepSeek's interleaved pairs on a strided slice.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from .harness import Case, Context, Impl, Row, r1kernels_backends, run_cases
from .shapes import RopeShape, rope_shapes

FAMILY = "rope"
DEVICES = ("cuda", "cpu")


def rope_flops(tokens: int, heads: int, dim: int, mode: str) -> float:
    return (3 if mode == "fwd" else 6) * tokens * heads * dim


def rope_bytes(tokens: int, heads: int, dim: int, x_bytes: int, mode: str) -> float:
    cos_sin = 2 * tokens * (dim // 2) * 4  # fp32 cos and sin
    passes = 1 if mode == "fwd" else 2
    return passes * (2 * tokens * heads * dim * x_bytes + cos_sin)


def torch_complex(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's ``apply_rotary_emb`` (inference/model.py) for ``[T, H, D]``: pairs as complex numbers
    times ``freqs_cis`` ([T, D/2] complex64, precomputed once per sequence as DeepSeek does)."""
    dtype = x.dtype
    xc = torch.view_as_complex(x.float().view(*x.shape[:-1], -1, 2))
    y = torch.view_as_real(xc * freqs_cis.view(x.size(0), 1, x.size(-1) // 2)).flatten(-2)
    return y.to(dtype)


def torch_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation in real arithmetic on the even / odd channels, re-interleaved by a stack."""
    xf = x.float()
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2).to(x.dtype)


def peers(ctx: Context) -> dict[str, str]:
    return {}


def cos_sin(ctx: Context, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin [tokens, D/2] for positions 0..tokens-1 with DeepSeek-V3's YaRN frequencies."""
    from r1kernels.ops import rope_cos_sin, rope_inv_freq

    d = ctx.shapes.dims
    inv_freq, attn_factor = rope_inv_freq(
        d.qk_rope_head_dim, d.rope_theta, scaling_type="yarn", factor=d.yarn_factor,
        original_max_position_embeddings=d.yarn_original_max_position, beta_fast=d.yarn_beta_fast,
        beta_slow=d.yarn_beta_slow, mscale=d.yarn_mscale, mscale_all_dim=d.yarn_mscale_all_dim,
    )
    positions = torch.arange(tokens, device=ctx.device)
    return rope_cos_sin(positions, inv_freq, attn_factor)


def cases(ctx: Context) -> Iterator[Case]:
    """Every rope case of the run, generated lazily (one shape's tensors alive at a time)."""
    for sh in rope_shapes(ctx.shapes):
        yield from _shape_cases(ctx, sh)


def _shape_cases(ctx: Context, sh: RopeShape) -> Iterator[Case]:
    import r1kernels

    parent = ctx.randn(sh.tokens, sh.heads, sh.parent_dim)
    x = parent[..., sh.offset : sh.offset + sh.dim]  # the model's strided slice
    dy = ctx.randn(sh.tokens, sh.heads, sh.dim)
    cos, sin = cos_sin(ctx, sh.tokens)
    freqs_cis = torch.complex(cos, sin)  # what DeepSeek's precompute_freqs_cis holds

    def fwd(f):
        return lambda: f(x)

    xg = x.detach().requires_grad_(True)  # a leaf view with the same strides

    def fwd_bwd(f):
        def step():
            y = f(xg)
            (dx,) = torch.autograd.grad(y, (xg,), dy)
            return y, dx

        return step

    for mode, run in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        impls = [
            Impl("torch complex", "torch", run(lambda t: torch_complex(t, freqs_cis))),
            Impl("torch real", "torch", run(lambda t: torch_real(t, cos, sin))),
        ]
        for b in r1kernels_backends(ctx):
            impls.append(
                Impl(b, "r1kernels", run(lambda t, b=b: r1kernels.ops.apply_rope(t, cos, sin, interleaved=True, backend=b)))
            )
        yield Case(
            family=FAMILY, op="apply_rope", label=sh.label, shape=sh.shape, mode=mode, dtype=ctx.dtype,
            flops=rope_flops(sh.tokens, sh.heads, sh.dim, mode),
            nbytes=rope_bytes(sh.tokens, sh.heads, sh.dim, x.element_size(), mode),
            impls=impls,
        )


def run(ctx: Context, ceilings: dict[str, Any], log: Callable[[str], None] = print) -> list[Row]:
    return run_cases(ctx, cases(ctx), ceilings, log)
