"""SwiGLU reference: silu(gate) * up, the activation of every DeepSeek MLP and expert."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed in fp32, returned in ``gate.dtype``.

    Args:
        gate: ``[..., I]`` (the W1 / gate_proj output), fp32 / fp16 / bf16, any strides.
        up: ``[..., I]`` (the W3 / up_proj output), same shape and dtype.
    """
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit gradients: with s = sigmoid(g), d silu(g)/dg = s * (1 + g * (1 - s)).

    Returns ``(dgate, dup)`` in the input dtypes.
    """
    g, u, d = gate.float(), up.float(), dy.float()
    s = torch.sigmoid(g)
    dgate = d * u * s * (1 + g * (1 - s))
    dup = d * g * s
    return dgate.to(gate.dtype), dup.to(up.dtype)
