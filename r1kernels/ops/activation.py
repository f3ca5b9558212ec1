"""Public SwiGLU op: validation, backend dispatch, autograd."""
from __future__ import annotations

import torch

from .. import reference
from .._dispatch import Impl, Op, always, triton_check
from ._validate import FLOAT_DTYPES, check_tensor


class _SwiGLUTriton(torch.autograd.Function):
    """The Triton path: fused forward, fused backward (both gradients in one pass)."""

    @staticmethod
    def forward(ctx, gate, up):
        from ..triton.activation import swiglu_fwd

        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        from ..triton.activation import swiglu_bwd

        gate, up = ctx.saved_tensors
        dgate, dup = swiglu_bwd(dy, gate, up)
        return (dgate if ctx.needs_input_grad[0] else None), (dup if ctx.needs_input_grad[1] else None)


def _swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLUTriton.apply(gate, up)


SWIGLU = Op("swiglu", {
    "reference": Impl(reference.swiglu, always),
    "triton": Impl(_swiglu_triton, triton_check),
})


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up``, the gated activation of DeepSeek MLPs and experts.

    Args:
        gate: ``[..., I]`` fp32 / fp16 / bf16 (gate_proj / W1 output), any strides (e.g. a half of a fused
            ``[..., 2I]`` projection).
        up: ``[..., I]``, same shape, dtype and device.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpu"``.
    Returns:
        ``[..., I]`` in ``gate.dtype``, computed in fp32. Differentiable in both inputs.
    """
    check_tensor("swiglu", "gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor("swiglu", "up", up, shape=tuple(gate.shape), dtypes=(gate.dtype,), device=gate.device)
    return SWIGLU(backend, gate, up)
