"""Public SwiGLU op: validation, backend dispatch, autograd."""
from __future__ import annotations

import torch

from .. import reference
from .._dispatch import Impl, Op, always
from ._validate import FLOAT_DTYPES, check_tensor

SWIGLU = Op("swiglu", {"reference": Impl(reference.swiglu, always)})


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
