"""``r1kernels.info()``: versions, devices and, per op, which backends can run here."""
from __future__ import annotations

import os
import platform
from typing import Any

import torch


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "present")
    except Exception:
        return "absent"


def info() -> dict[str, Any]:
    """A JSON-serialisable report.

    Keys: ``versions`` (python, r1kernels, torch, triton, transformers), ``extension`` (built? CUDA part?
    why not), ``devices`` (cpu, and each CUDA device with its name and capability), ``env`` (the R1K_* and
    TRITON_INTERPRET variables that are set), ``ops``: ``{op: {device: {backend: "ok" | why not}}}``.
    """
    from . import __version__, _native
    from .ops import ALL_OPS

    mod = _native.module()
    devices = [torch.device("cpu")]
    dev_info: dict[str, Any] = {"cpu": {"threads": torch.get_num_threads()}}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            d = torch.device("cuda", i)
            devices.append(d)
            dev_info[str(d)] = {
                "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
            }
    ops: dict[str, Any] = {}
    for op in ALL_OPS:
        ops[op.name] = {
            str(d): {b: ("ok" if why is None else why) for b, why in op.availability(d).items()} for d in devices
        }
    return {
        "versions": {
            "python": platform.python_version(),
            "r1kernels": __version__,
            "torch": torch.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "cuda (torch)": torch.version.cuda or "none",
        },
        "extension": {
            "built": mod is not None,
            "cuda_part": bool(getattr(mod, "built_with_cuda", False)) if mod is not None else False,
            "cuda_archs": getattr(mod, "cuda_archs", "") if mod is not None else "",
            "why_not": _native.cpu_reason(),
        },
        "devices": dev_info,
        "env": {k: v for k, v in os.environ.items() if k.startswith("R1K_") or k == "TRITON_INTERPRET"},
        "ops": ops,
    }


def format_info(report: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`info` (what ``r1k info`` prints)."""
    lines = ["r1kernels " + report["versions"]["r1kernels"]]
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if k != "r1kernels"))
    ext = report["extension"]
    if ext["built"]:
        lines.append(f"extension: r1kernels._C built; CUDA part: {'yes (' + ext['cuda_archs'] + ')' if ext['cuda_part'] else 'no'}")
    else:
        lines.append(f"extension: not built ({ext['why_not']})")
    lines.append("devices: " + ", ".join(f"{k} {v}" for k, v in report["devices"].items()))
    if report["env"]:
        lines.append("env: " + ", ".join(f"{k}={v}" for k, v in report["env"].items()))
    lines.append("ops (backends that can run here, per device):")
    width = max((len(n) for n in report["ops"]), default=0) + 1
    for name, per_dev in report["ops"].items():
        for dev, backends in per_dev.items():
            ok = [b for b, s in backends.items() if s == "ok"]
            lines.append(f"  {name:<{width}} {dev:<8} {', '.join(ok)}")
    lines.append("why not (per op, device, backend):")
    for name, per_dev in report["ops"].items():
        for dev, backends in per_dev.items():
            for b, s in backends.items():
                if s != "ok" and s != "not implemented for this op":
                    lines.append(f"  {name} {dev} {b}: {s}")
    return "\n".join(lines)
