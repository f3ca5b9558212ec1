"""Argument checks shared by the public ops: every error names the argument, what was expected and what came."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fmt_dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return " / ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    t,
    *,
    ndim: Optional[int | Sequence[int]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    device: Optional[torch.device] = None,
) -> None:
    """Raise a TypeError / ValueError naming ``op`` and ``name`` if ``t`` does not fit.

    ``shape`` entries that are None are free.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"r1kernels.ops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(
                f"r1kernels.ops.{op}: {name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}"
            )
    if shape is not None:
        ok = len(shape) == t.dim() and all(s is None or s == d for s, d in zip(shape, t.shape))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"r1kernels.ops.{op}: {name} must have shape {want}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"r1kernels.ops.{op}: {name} must be {_fmt_dtypes(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"r1kernels.ops.{op}: {name} is on {t.device} but the other inputs are on {device}")
