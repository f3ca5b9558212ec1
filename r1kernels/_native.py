"""Loads the compiled extension ``r1kernels._C`` if it was built; ``import r1kernels`` works without it."""
from __future__ import annotations

import functools
from typing import Optional


@functools.lru_cache(maxsize=1)
def _load():
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"the compiled extension r1kernels._C is not built ({exc}); reinstall without R1K_NO_EXT=1"
    return _C, None


def module():
    """The extension module, or None."""
    return _load()[0]


def cpu_reason() -> Optional[str]:
    return _load()[1]


def cuda_reason() -> Optional[str]:
    mod, why = _load()
    if mod is None:
        return why
    if not getattr(mod, "built_with_cuda", False):
        return "r1kernels._C was built without its CUDA part (nvcc not found at build time, or R1K_NO_CUDA=1)"
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None
