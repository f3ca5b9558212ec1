"""Public RMSNorm op: validation, backend dispatch, autograd."""
from __future__ import annotations

import torch

from .. import reference
from .._dispatch import Impl, Op, always
from ._validate import FLOAT_DTYPES, check_tensor

RMS_NORM = Op("rms_norm", {"reference": Impl(reference.rms_norm, always)})


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
