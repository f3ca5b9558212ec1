"""Backend selection for every public op.

Each op in ``r1kernels.ops`` is described by an :class:`Op`: a name and, per backend, an implementation
plus a ``check`` that says why that backend cannot run a given call (or ``None`` when it can).

Selection, per call (DESIGN "Backends and dispatch"):

* an explicit ``backend=`` other than ``"auto"`` wins; else ``use_backend(...)``; else ``R1K_BACKEND``;
* ``"auto"``: CUDA tensors -> ``cuda`` (extension built and supports the arguments), else ``triton``,
  else ``reference``; CPU tensors -> ``cpu`` (C++ kernel) if one exists and supports them, else
  ``reference``. Triton on CPU (interpreter) is never picked by ``auto``; tests force it.
* a forced backend that cannot run raises :class:`BackendUnavailable` naming what is missing; there is
  never a silent fallback from a forced backend.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("reference", "triton", "cuda", "cpu")
_CHOICES = ("auto",) + BACKENDS

# The backend forced by ``use_backend``; a ContextVar so that threads and asyncio tasks do not leak
# their choice into each other (this is the only piece of process state, and it is scoped).
_FORCED: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("r1k_forced_backend", default=None)


class BackendUnavailable(RuntimeError):
    """A backend was asked for explicitly (argument, ``use_backend`` or ``R1K_BACKEND``) and cannot run."""


def _validate(name: str, where: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {', '.join(_CHOICES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every op called inside the ``with`` block (unless a call passes its own)."""
    token = _FORCED.set(_validate(name, "use_backend"))
    try:
        yield
    finally:
        _FORCED.reset(token)


def _ambient_backend() -> str:
    """The backend forced by ``use_backend`` or else ``R1K_BACKEND`` (``"auto"`` when neither is set)."""
    forced = _FORCED.get()
    if forced is not None and forced != "auto":
        return forced
    env = os.environ.get("R1K_BACKEND", "").strip()
    return _validate(env, "R1K_BACKEND") if env else "auto"


# torch.compile cannot trace ContextVar.get; the ambient choice is read once when a graph is traced and
# baked into it (like any other configuration read at trace time): a compiled function keeps the backend
# it was compiled with. This is what torch.compiler.assume_constant_result does (it sets this marker);
# calling it would import torch._dynamo, and with it triton, at `import r1kernels`.
_ambient_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]


def requested_backend(backend: str = "auto") -> str:
    """The backend a call asks for once ``use_backend`` and ``R1K_BACKEND`` are taken into account."""
    _validate(backend, "backend=")
    if backend != "auto":
        return backend
    return _ambient_backend()


# ----------------------------------------------------------------------------------------------------
# Environment checks shared by the ops. Each returns None when the backend can run on `device`, else a
# sentence saying what is missing.

def triton_reason(device: torch.device) -> Optional[str]:
    """Why Triton cannot run on ``device`` here (None if it can)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set (Triton runs on CPU only under its interpreter)"
    return f"triton does not run on device type {device.type!r}"


def native_reason(device: torch.device) -> Optional[str]:
    """Why the compiled extension cannot run on ``device`` (None if it can)."""
    from . import _native

    if device.type == "cpu":
        return _native.cpu_reason()
    if device.type == "cuda":
        return _native.cuda_reason()
    return f"the compiled extension has no kernels for device type {device.type!r}"


def _first_device(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


Check = Callable[..., Optional[str]]


@dataclass(frozen=True)
class Impl:
    """One backend of one op: ``fn(*args)`` computes it, ``check(*args)`` says why it cannot (or None)."""

    fn: Callable
    check: Check
    # For ``availability`` (``r1kernels.info()``): why the backend cannot run on a device at all, for a
    # backend whose needs differ from its name's usual ones (a ``cpu`` backend written in torch needs no
    # compiled extension). None: the name's usual environment check.
    device_check: Optional[Callable[[torch.device], Optional[str]]] = None


class Op:
    """The dispatch table of one public op."""

    def __init__(self, name: str, impls: dict[str, Impl]):
        unknown = set(impls) - set(BACKENDS)
        if unknown:
            raise ValueError(f"op {name}: unknown backends {sorted(unknown)}")
        if "reference" not in impls:
            raise ValueError(f"op {name}: every op needs a reference implementation")
        self.name = name
        self.impls = dict(impls)

    def select(self, backend: str, *args) -> tuple[str, Callable]:
        """Pick the implementation for these arguments; returns ``(backend_name, fn)``."""
        req = requested_backend(backend)
        if req == "auto":
            dev = _first_device(args)
            order = ("cuda", "triton") if dev.type == "cuda" else ("cpu",)
            for b in order:
                impl = self.impls.get(b)
                if impl is not None and impl.check(*args) is None:
                    return b, impl.fn
            return "reference", self.impls["reference"].fn
        impl = self.impls.get(req)
        if impl is None:
            have = ", ".join(self.impls)
            raise BackendUnavailable(f"r1kernels.ops.{self.name}: there is no {req!r} backend for this op (it has: {have})")
        reason = impl.check(*args)
        if reason is not None:
            raise BackendUnavailable(f"r1kernels.ops.{self.name}: backend {req!r} cannot run this call: {reason}")
        return req, impl.fn

    def __call__(self, backend: str, *args):
        return self.select(backend, *args)[1](*args)

    def availability(self, device: torch.device) -> dict[str, Optional[str]]:
        """Per backend, None if it can run on ``device`` in this environment, else why not."""
        out: dict[str, Optional[str]] = {}
        for b in BACKENDS:
            if b not in self.impls:
                out[b] = "not implemented for this op"
            elif self.impls[b].device_check is not None:
                out[b] = self.impls[b].device_check(device)
            elif b == "reference":
                out[b] = None
            elif b == "triton":
                out[b] = triton_reason(device)
            elif b == "cpu":
                out[b] = native_reason(device) if device.type == "cpu" else "runs on CPU tensors only"
            elif b == "cuda":
                out[b] = native_reason(device) if device.type == "cuda" else "runs on CUDA tensors only"
        return out


def always(*_args) -> Optional[str]:
    return None


def triton_check(*args) -> Optional[str]:
    return triton_reason(_first_device(args))


def on_device(kind: str, native: bool = True) -> Check:
    """A check for the native ``cpu`` / ``cuda`` backends: right device type and extension present."""

    def check(*args) -> Optional[str]:
        dev = _first_device(args)
        if dev.type != kind:
            return f"this backend takes {kind} tensors, got {dev.type} tensors"
        return native_reason(dev) if native else None

    return check
