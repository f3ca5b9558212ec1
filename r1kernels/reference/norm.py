"""RMSNorm reference.

Letters: N rows (all leading dims flattened), D the normalised (last) dim.
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32, returned in ``x.dtype``.

    Args:
        x: ``[..., D]``, fp32 / fp16 / bf16, any strides.
        weight: ``[D]``, any float dtype (upcast to fp32).
        eps: added to the mean square.
    Returns:
        ``[..., D]`` in ``x.dtype``. One rounding at the end (transformers rounds the normalised x to
        ``x.dtype`` before the weight multiply; the two agree exactly in fp32).
    """
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit gradients of :func:`rms_norm`: returns ``(dx [..., D] in x.dtype, dweight [D] in weight.dtype)``.

    With r = (mean(x^2) + eps)^-1/2 and g = dy * w:  dx = r*g - x * r^3 * mean(g*x),  dw = sum_rows dy*x*r.
    """
    xf, dyf, wf = x.float(), dy.float(), weight.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    g = dyf * wf
    dx = rstd * g - xf * rstd.pow(3) * (g * xf).mean(-1, keepdim=True)
    dw = (dyf * xf * rstd).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)
