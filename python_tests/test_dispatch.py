"""Backend selection: backend=, use_backend, R1K_BACKEND, BackendUnavailable, info() and `r1k info`."""
import json
import os
import subprocess
import sys

import pytest
import torch

import r1kernels
from r1kernels import BackendUnavailable, use_backend
from r1kernels._dispatch import Impl, Op, always, requested_backend
from r1kernels.ops import ALL_OPS


def _probe_op():
    calls = []

    def make(name):
        def fn(x):
            calls.append(name)
            return x

        return fn

    op = Op("probe", {
        "reference": Impl(make("reference"), always),
        "triton": Impl(make("triton"), lambda x: None if x.device.type == "cuda" else "needs CUDA here"),
        "cpu": Impl(make("cpu"), always),
    })
    return op, calls


def test_auto_picks_cpu_kernel_on_cpu_and_explicit_wins():
    op, calls = _probe_op()
    x = torch.zeros(2)
    op("auto", x)
    op("reference", x)
    assert calls == ["cpu", "reference"]


def test_use_backend_and_env_and_precedence(monkeypatch):
    op, calls = _probe_op()
    x = torch.zeros(2)
    with use_backend("reference"):
        op("auto", x)
        op("cpu", x)  # an explicit argument beats the context manager
        with use_backend("cpu"):
            op("auto", x)
        op("auto", x)  # restored on exit
    monkeypatch.setenv("R1K_BACKEND", "reference")
    op("auto", x)
    with use_backend("cpu"):  # the context manager beats the environment
        op("auto", x)
    assert calls == ["reference", "cpu", "cpu", "reference", "reference", "cpu"]


def test_forced_backend_that_cannot_run_raises_and_never_falls_back():
    op, calls = _probe_op()
    with pytest.raises(BackendUnavailable, match="'triton' cannot run this call: needs CUDA here"):
        op("triton", torch.zeros(2))
    with pytest.raises(BackendUnavailable, match="no 'cuda' backend for this op"):
        op("cuda", torch.zeros(2))
    assert calls == []


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        requested_backend("tpu")
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("fast"):
            pass
    monkeypatch.setenv("R1K_BACKEND", "gpu")
    with pytest.raises(ValueError, match="R1K_BACKEND"):
        r1kernels.ops.rms_norm(torch.ones(2, 4), torch.ones(4))


def test_every_public_op_takes_backend_and_reference_always_runs():
    x = torch.randn(3, 8)
    w = torch.randn(8)
    out = r1kernels.ops.rms_norm(x, w, backend="reference")
    torch.testing.assert_close(out, r1kernels.reference.rms_norm(x, w))
    for op in ALL_OPS:
        assert op.availability(torch.device("cpu"))["reference"] is None


def test_cuda_backend_on_cpu_tensors_is_unavailable():
    with pytest.raises(BackendUnavailable, match="rms_norm"):
        r1kernels.ops.rms_norm(torch.ones(2, 4), torch.ones(4), backend="cuda")


def test_triton_without_interpreter_on_cpu_names_what_is_missing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from r1kernels._dispatch import triton_reason

    why = triton_reason(torch.device("cpu"))
    assert why is not None and "TRITON_INTERPRET" in why


def test_info_lists_every_op_and_backend():
    report = r1kernels.info()
    assert set(report["ops"]) == {op.name for op in ALL_OPS}
    for name, per_device in report["ops"].items():
        assert per_device["cpu"]["reference"] == "ok"
        assert set(per_device["cpu"]) == set(r1kernels.BACKENDS)
    assert report["versions"]["torch"] == torch.__version__
    json.dumps(report)  # serialisable


def test_r1k_info_command():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-m", "r1kernels.cli", "info"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for op in ALL_OPS:
        assert op.name in out.stdout
    js = subprocess.run([sys.executable, "-m", "r1kernels.cli", "info", "--json"], capture_output=True, text=True,
                        env=env, timeout=120)
    assert json.loads(js.stdout)["ops"]["rms_norm"]["cpu"]["reference"] == "ok"


def test_import_and_ops_work_without_the_extension():
    """As after an R1K_NO_EXT=1 install: r1kernels._C cannot be imported."""
    script = (
        "import sys; sys.modules['r1kernels._C'] = None\n"
        "import torch, r1kernels\n"
        "from r1kernels import ops\n"
        "x = torch.randn(3, 8); w = torch.ones(8)\n"
        "torch.testing.assert_close(ops.rms_norm(x, w), r1kernels.reference.rms_norm(x, w))\n"
        "rep = r1kernels.info()\n"
        "assert rep['extension']['built'] is False, rep['extension']\n"
        "assert 'not built' in rep['ops']['rms_norm']['cpu']['cpu'], rep['ops']['rms_norm']['cpu']\n"
        "try:\n"
        "    ops.rms_norm(x, w, backend='cpu')\n"
        "except r1kernels.BackendUnavailable as e:\n"
        "    assert 'r1kernels._C' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('forced cpu backend without the extension did not raise')\n"
        "m = r1kernels.Transformer(r1kernels.ModelConfig.preset('tiny'))\n"
        "assert torch.isfinite(m(torch.zeros(1, 4, dtype=torch.long))).all()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_auto_dispatch_compiles_fullgraph():
    """torch.compile traces through dispatch: the ambient backend is read at trace time."""
    x, w = torch.randn(4, 64), torch.randn(64)
    f = torch.compile(lambda x, w: r1kernels.ops.rms_norm(x, w) * 2 + 1, fullgraph=True)
    torch.testing.assert_close(f(x, w), r1kernels.reference.rms_norm(x, w) * 2 + 1, atol=1e-5, rtol=1e-5)
