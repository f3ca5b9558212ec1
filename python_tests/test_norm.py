"""RMSNorm: the Triton backend against the reference, forward and backward.

Runs on the GPU when there is one, else under the Triton interpreter (conftest sets TRITON_INTERPRET);
bf16 only on the GPU (the interpreter rounds fp32 -> bf16 by truncation).
"""
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_reduction_close, tol

import r1kernels
from r1kernels import ops, reference

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERP_DTYPES = [torch.float32, torch.float16]


def _rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEV, dtype=dtype)


def _fwd_bwd(x, w, eps, dy):
    """Triton output and (dx, dweight) through its autograd.Function."""
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    y = ops.rms_norm(x, w, eps, backend="triton")
    y.backward(dy)
    return y, x.grad, w.grad


def _check_against_reference(x, w, eps=1e-6, dy=None):
    dy = _rand(*x.shape, dtype=x.dtype, seed=7) if dy is None else dy
    y, dx, dw = _fwd_bwd(x, w, eps, dy)
    ref_dx, ref_dw = reference.rms_norm_backward(dy, x, w, eps)
    torch.testing.assert_close(y, reference.rms_norm(x, w, eps), **tol(x.dtype))
    torch.testing.assert_close(dx, ref_dx, **tol(x.dtype))
    # sum over rows of |dy * x * rstd|: the reference's dweight of |dy| and |x| (rstd only sees x^2)
    abs_sum = reference.rms_norm_backward(dy.abs(), x.abs(), w.float(), eps)[1]
    assert_reduction_close(dw, ref_dw, abs_sum, w.dtype)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == w.dtype


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (17, 129), (2, 3, 129), (129, 3), (1000, 4096), (33, 4097)])
def test_forward_backward_match_reference(shape, dtype):
    x = _rand(*shape, dtype=dtype)
    w = _rand(shape[-1], dtype=dtype, seed=1) * 0.5 + 1.0
    _check_against_reference(x, w)


@pytest.mark.parametrize("shape", [(3, 17), (2, 5, 129)])
def test_grads_match_autograd_through_reference_fp32(shape):
    x = _rand(*shape).requires_grad_(True)
    w = (_rand(shape[-1], seed=1) + 1.0).requires_grad_(True)
    dy = _rand(*shape, seed=2)
    reference.rms_norm(x, w).backward(dy)
    ref = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    ops.rms_norm(x, w, backend="triton").backward(dy)
    torch.testing.assert_close(x.grad, ref[0], **tol(torch.float32))
    torch.testing.assert_close(w.grad, ref[1], **tol(torch.float32))


def test_half_input_with_fp32_weight():
    # DeepSeek keeps norm weights in fp32 while activations are half: y and dx in x's dtype, dw in fp32.
    _check_against_reference(_rand(17, 129, dtype=torch.float16), _rand(129, seed=1) + 1.0)


def test_eps_is_used():
    # Tiny inputs: the result depends on eps as much as on x.
    x = _rand(5, 33, scale=1e-3)
    w = _rand(33, seed=1)
    _check_against_reference(x, w, eps=1e-5)
    a = ops.rms_norm(x, w, 1e-6, backend="triton")
    b = ops.rms_norm(x, w, 1e-2, backend="triton")
    assert not torch.allclose(a, b, **tol(torch.float32))


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_non_contiguous_inputs(dtype):
    base = _rand(129, 40, dtype=dtype)  # [D, N]
    w_base = _rand(2 * 129, dtype=dtype, seed=1) + 1.0
    w = w_base[::2]  # weight with stride 2
    # x transposed: rows have stride 1, columns stride N.
    x_t = base.t()
    assert not x_t.is_contiguous()
    _check_against_reference(x_t, w)
    # x a slice of a wider tensor (row stride > D), and dy transposed.
    wide = _rand(7, 3, 200, dtype=dtype, seed=3)
    x_s = wide[..., 50:179]
    assert not x_s.is_contiguous()
    dy = _rand(129, 3, 7, dtype=dtype, seed=4).permute(2, 1, 0)
    _check_against_reference(x_s, w, dy=dy)
    # leading dims that cannot be merged into one stride
    x_p = _rand(3, 7, 129, dtype=dtype, seed=5).transpose(0, 1)
    _check_against_reference(x_p, w)


def test_weight_grad_is_deterministic():
    x = _rand(257, 129)
    w = _rand(129, seed=1)
    dy = _rand(257, 129, seed=2)
    grads = [_fwd_bwd(x, w, 1e-6, dy)[2] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_only_the_needed_grad():
    x = _rand(3, 17).requires_grad_(True)
    w = _rand(17, seed=1)  # a frozen weight
    ops.rms_norm(x, w, backend="triton").sum().backward()
    ref_dx, _ = reference.rms_norm_backward(torch.ones(3, 17, device=DEV), x.detach(), w)
    torch.testing.assert_close(x.grad, ref_dx, **tol(torch.float32))
    assert w.grad is None


def test_empty_rows():
    x = _rand(0, 17).requires_grad_(True)
    w = _rand(17, seed=1).requires_grad_(True)
    y = ops.rms_norm(x, w, backend="triton")
    assert y.shape == (0, 17)
    y.sum().backward()
    assert x.grad.shape == (0, 17)
    assert torch.equal(w.grad, torch.zeros(17, device=DEV))


def test_errors_name_the_argument():
    x = _rand(3, 17)
    with pytest.raises(ValueError, match=r"rms_norm: weight must have shape \[17\]"):
        ops.rms_norm(x, _rand(16), backend="triton")
    with pytest.raises(TypeError, match=r"rms_norm: x must be float32"):
        ops.rms_norm(x.to(torch.int32), _rand(17), backend="triton")
    with pytest.raises(TypeError, match=r"rms_norm: weight must be float32"):
        ops.rms_norm(x, _rand(17).to(torch.float64), backend="triton")
    with pytest.raises(ValueError, match=r"x must have at least 1 dim"):
        ops.rms_norm(x[0, 0], _rand(1), backend="triton")
    # the launcher checks too, for callers that bypass the op
    from r1kernels.triton.norm import rms_norm_bwd, rms_norm_fwd

    with pytest.raises(ValueError, match=r"rms_norm_fwd: weight must have shape \[D\]"):
        rms_norm_fwd(x, _rand(16), 1e-6)
    with pytest.raises(ValueError, match=r"rms_norm_bwd: rstd must be fp32"):
        rms_norm_bwd(x, x, _rand(17), torch.ones(4, device=DEV))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter switch")
def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(r1kernels.BackendUnavailable, match="TRITON_INTERPRET=1 is not set"):
        ops.rms_norm(_rand(3, 17), _rand(17), backend="triton")


def test_import_does_not_import_triton():
    code = "import sys, r1kernels; assert 'triton' not in sys.modules, 'triton was imported'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 17), (129, 7168), (4096, 512), (1000, 1536)])
def test_bf16_on_gpu(shape, w_dtype):
    x = _rand(*shape, dtype=torch.bfloat16)
    w = (_rand(shape[-1], seed=1) * 0.5 + 1.0).to(w_dtype)
    _check_against_reference(x, w)
