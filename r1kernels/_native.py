"""Loads the compiled extension ``r1kernels._C`` if it was built; ``import r1kernels`` works without it."""
from __future__ import annotations

from typing import Optional


# (module, why not) once loaded. A plain memo rather than functools.lru_cache: torch.compile traces the
# dispatch checks that call this, and Dynamo warns on every lru_cache-wrapped function it meets.
_LOADED: Optional[tuple] = None


def _load():
    global _LOADED
    if _LOADED is None:
        try:
            from . import _C  # type: ignore[attr-defined]
        except ImportError as exc:
            _LOADED = (
                None,
                f"the compiled extension r1kernels._C is not built ({exc}); it is absent after an install with "
                "R1K_NO_EXT=1 or in a source checkout never built: reinstall (pip install .) without R1K_NO_EXT=1, "
                "or run `python setup.py build_ext --inplace` in the checkout",
            )
        else:
            _LOADED = (_C, None)
    return _LOADED


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


_DEVICE_PROBLEMS: dict[int, Optional[str]] = {}  # per CUDA device index; memo as for _LOADED


def _cuda_device_problem(index: int) -> Optional[str]:
    if index not in _DEVICE_PROBLEMS:
        _DEVICE_PROBLEMS[index] = module().cuda_device_problem(index) or None
    return _DEVICE_PROBLEMS[index]


def cuda_device_reason(device) -> Optional[str]:
    """Why the CUDA kernels cannot run on CUDA ``device`` (None if they can): :func:`cuda_reason`, or no
    code for the device's architecture in this build (R1K_CUDA_ARCHS), or a driver too old for the
    CUDA runtime the module links. Asked of the module once per device."""
    why = cuda_reason()
    if why is not None:
        return why
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_device_problem(index)
