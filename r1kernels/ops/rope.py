"""Public rotary-embedding op: validation, backend dispatch, autograd.

The frequency tables (``rope_inv_freq`` with YaRN, ``rope_cos_sin``) are cheap setup and are re-exported
from the reference; ``apply_rope`` is the per-token kernel.
"""
from __future__ import annotations

import torch

from .. import reference
from .._dispatch import Impl, Op, always, triton_check
from ..reference.rope import rope_cos_sin, rope_inv_freq, yarn_get_mscale  # noqa: F401  (public helpers)
from ._validate import FLOAT_DTYPES, check_tensor


class _ApplyRopeTriton(torch.autograd.Function):
    """The Triton path; the gradient of a rotation is the inverse rotation (same kernel, sin negated)."""

    @staticmethod
    def forward(ctx, x, cos, sin, interleaved):
        from ..triton.rope import apply_rope as launch

        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return launch(x, cos, sin, interleaved)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        from ..triton.rope import apply_rope as launch

        cos, sin = ctx.saved_tensors
        return launch(dy, cos, sin, ctx.interleaved, inverse=True), None, None, None


def _apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    return _ApplyRopeTriton.apply(x, cos, sin, interleaved)


APPLY_ROPE = Op("apply_rope", {
    "reference": Impl(reference.apply_rope, always),
    "triton": Impl(_apply_rope_triton, triton_check),
})


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = True, backend: str = "auto"
) -> torch.Tensor:
    """Rotate the last dim of ``x`` by the per-token angles whose cos / sin are given.

    Args:
        x: ``[T, H, D]`` or ``[B, S, H, D]`` fp32 / fp16 / bf16, D even, any strides.
        cos, sin: ``[T, D/2]`` for 3-D x; ``[B, S, D/2]`` or ``[S, D/2]`` for 4-D x; fp32; from
            :func:`rope_cos_sin` (YaRN's attention factor already folded in).
        interleaved: pairs are channels (2i, 2i+1) (DeepSeek) when True, (i, i + D/2) (NeoX) when False.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpu"``.
    Returns:
        Same shape, dtype and channel layout as ``x``. Differentiable in ``x`` (the gradient is the inverse
        rotation); cos and sin are treated as constants.
    """
    check_tensor("apply_rope", "x", x, ndim=(3, 4), dtypes=FLOAT_DTYPES)
    if x.shape[-1] % 2:
        raise ValueError(f"r1kernels.ops.apply_rope: the last dim of x must be even, got shape {tuple(x.shape)}")
    p = x.shape[-1] // 2
    if x.dim() == 3:
        want = [(x.shape[0], p)]
    else:
        want = [(x.shape[0], x.shape[1], p), (x.shape[1], p)]
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor("apply_rope", name, t, dtypes=(torch.float32,), device=x.device)
        if tuple(t.shape) not in want:
            raise ValueError(
                f"r1kernels.ops.apply_rope: {name} must have shape {' or '.join(str(list(w)) for w in want)} "
                f"for x of shape {tuple(x.shape)}, got {tuple(t.shape)}"
            )
    return APPLY_ROPE(backend, x, cos, sin, bool(interleaved))
