"""The compiled extension's kernels as ``torch.library`` custom ops, and their entries in the dispatch tables.

Letters: N rows (all leading dims flattened), D the normalised (last) dim.

``r1kernels._C`` knows nothing about torch (DESIGN "The compiled extension"): it takes addresses, sizes,
row strides in elements and dtype codes. This module turns tensors into those arguments and registers
each kernel as a custom op with a fake (meta) implementation and an autograd formula, so that
``torch.compile`` traces through it and ``backward`` works. The ops are registered when this module is
imported, whether or not ``_C`` was built; calling one without ``_C`` raises a RuntimeError that says why.
"""

from typing import Optional

import torch

from .. import _native as _loader
from .._dispatch import Impl, on_device
from ..reference.norm import rms_norm_backward

# torch dtype -> the dtype code of the native boundary (csrc/common.h, enum DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_OP = "r1kernels::rms_norm_native"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _rms_norm_problem(x: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    """Why (x, weight) is not an input the native RMSNorm takes, or None. Shared by the op and the checks."""
    if x.dim() < 1:
        return "x must have at least 1 dim, got a scalar"
    if x.dtype not in DTYPE_CODES:
        return f"x must be float32 / float16 / bfloat16, got {_dtype_name(x.dtype)}"
    if weight.dtype not in DTYPE_CODES:
        return f"weight must be float32 / float16 / bfloat16, got {_dtype_name(weight.dtype)}"
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        return f"weight must have shape [{x.shape[-1]}] (x's last dim), got {tuple(weight.shape)}"
    if weight.device != x.device:
        return f"weight is on {weight.device} but x is on {x.device}"
    return None


def _eps_problem(eps: float) -> Optional[str]:
    if not (0.0 <= eps < float("inf")):  # also rejects NaN
        return f"eps must be a finite number >= 0, got {eps}"
    return None


def _check_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    why = _rms_norm_problem(x, weight) or _eps_problem(eps)
    if why is not None:
        raise ValueError(f"{_OP}: {why}")


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[N, D]`` rows with unit column stride: a view when the leading dims collapse to one row
    stride (contiguous tensors, slices along the last dim, broadcast rows), else a contiguous copy."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


@torch.library.custom_op(_OP, mutates_args=())
def rms_norm_native(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm forward by the compiled kernel of x's device: ``[..., D]`` in, same shape and dtype out,
    contiguous. Differentiable; the backward is :func:`r1kernels.reference.norm.rms_norm_backward`."""
    _check_rms_norm(x, weight, eps)
    mod = _loader.module()
    if mod is None:
        raise RuntimeError(f"{_OP}: {_loader.cpu_reason()}")
    out = x.new_empty(x.shape)
    if out.numel() == 0:
        return out
    rows = _as_rows(x)
    w = weight.contiguous()
    n, d = rows.shape
    args = (out.data_ptr(), rows.data_ptr(), w.data_ptr(), n, d, rows.stride(0), d,
            DTYPE_CODES[x.dtype], DTYPE_CODES[w.dtype], eps)
    if x.device.type == "cpu":
        # torch's intra-op thread count, so that torch.set_num_threads governs this kernel too.
        mod.rms_norm_cpu(*args, num_threads=torch.get_num_threads())
    elif x.device.type == "cuda":
        if not mod.built_with_cuda:
            raise RuntimeError(f"{_OP}: {_loader.cuda_reason()}")
        stream = torch.cuda.current_stream(x.device).cuda_stream
        mod.rms_norm_cuda(*args, device=x.device.index, stream=stream)
    else:
        raise ValueError(f"{_OP}: the compiled extension has no kernels for device type {x.device.type!r}")
    return out


@rms_norm_native.register_fake
def _rms_norm_native_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_rms_norm(x, weight, eps)
    return x.new_empty(x.shape)


def _rms_norm_setup_context(ctx, inputs, output) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_backward(ctx, dy: torch.Tensor):
    x, weight = ctx.saved_tensors
    dx, dw = rms_norm_backward(dy, x, weight, ctx.eps)
    return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None, None)


rms_norm_native.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


# ----------------------------------------------------------------------------------------------------
# Dispatch-table entries (r1kernels._dispatch.Impl): the check says why a backend cannot run a call, so
# that "auto" passes over it and a forced backend raises BackendUnavailable with that reason.

_on_cpu = on_device("cpu")
_on_cuda = on_device("cuda")


def _rms_norm_cpu_check(x, weight, eps=1e-6) -> Optional[str]:
    return _on_cpu(x, weight, eps) or _rms_norm_problem(x, weight) or _eps_problem(eps)


def _rms_norm_cuda_check(x, weight, eps=1e-6) -> Optional[str]:
    why = _on_cuda(x, weight, eps) or _rms_norm_problem(x, weight) or _eps_problem(eps)
    if why is not None:
        return why
    n_rows = x.numel() // max(x.shape[-1], 1)
    if n_rows >= 2**31:
        return f"x has {n_rows} rows; the CUDA kernel takes fewer than 2^31"
    return _loader.cuda_device_reason(x.device)


RMS_NORM_CPU = Impl(rms_norm_native, _rms_norm_cpu_check)
RMS_NORM_CUDA = Impl(rms_norm_native, _rms_norm_cuda_check)
