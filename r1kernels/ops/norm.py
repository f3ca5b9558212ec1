"""Public RMSNorm op: validation, backend dispatch, autograd."""
from __future__ import annotations

import torch

from .. import reference
from .._dispatch import Impl, Op, always, triton_check
from ._native import RMS_NORM_CPU, RMS_NORM_CUDA
from ._validate import FLOAT_DTYPES, check_tensor


class _RMSNormTriton(torch.autograd.Function):
    """The Triton path: the forward keeps 1/rms per row (fp32) for the backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        from ..triton.norm import rms_norm_fwd

        y, rstd = rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        from ..triton.norm import rms_norm_bwd

        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, x, weight, rstd)
        return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), None


def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNormTriton.apply(x, weight, eps)


def _rms_norm_triton_check(x: torch.Tensor, weight: torch.Tensor, eps: float):
    why = triton_check(x, weight, eps)
    if why is None:
        from ..triton.norm import MAX_D  # triton is importable once triton_check passed

        if x.shape[-1] > MAX_D:
            why = f"the Triton kernel holds a row in one tile of at most {MAX_D} elements; D = {x.shape[-1]}"
    return why


RMS_NORM = Op("rms_norm", {
    "reference": Impl(reference.rms_norm, always),
    "cpu": RMS_NORM_CPU,
    "cuda": RMS_NORM_CUDA,
    "triton": Impl(_rms_norm_triton, _rms_norm_triton_check),
})


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """Root-mean-square normalisation over the last dim.

    Args:
        x: ``[..., D]`` fp32 / fp16 / bf16, any strides.
        weight: ``[D]``, fp32 / fp16 / bf16, on x's device.
        eps: added to the mean square before the reciprocal square root.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpu"``.
    Returns:
        ``[..., D]`` in ``x.dtype``: ``x * rsqrt(mean(x^2) + eps) * weight`` computed in fp32.
    Differentiable in ``x`` and ``weight`` on every backend.
    """
    check_tensor("rms_norm", "x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("r1kernels.ops.rms_norm: x must have at least 1 dim, got a scalar")
    check_tensor("rms_norm", "weight", weight, shape=(x.shape[-1],), dtypes=FLOAT_DTYPES, device=x.device)
    return RMS_NORM(backend, x, weight, float(eps))
