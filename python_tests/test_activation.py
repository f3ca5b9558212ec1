"""SwiGLU: the Triton backend against the reference, forward and backward.

Runs on the GPU when there is one, else under the Triton interpreter; bf16 only on the GPU.
"""
import pytest
import torch
from conftest import tol

from r1kernels import ops, reference

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERP_DTYPES = [torch.float32, torch.float16]


def _rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=DEV, dtype=dtype)


def assert_matches_reference(gate, up, dy=None):
    """Triton forward and backward against the reference and its explicit backward."""
    dy = _rand(*gate.shape, dtype=gate.dtype, seed=9) if dy is None else dy
    g = gate.detach().requires_grad_(True)
    u = up.detach().requires_grad_(True)
    y = ops.swiglu(g, u, backend="triton")
    y.backward(dy)
    ref_dg, ref_du = reference.swiglu_backward(dy, gate, up)
    assert y.dtype == gate.dtype and y.shape == gate.shape
    torch.testing.assert_close(y, reference.swiglu(gate, up), **tol(gate.dtype))
    torch.testing.assert_close(g.grad, ref_dg, **tol(gate.dtype))
    torch.testing.assert_close(u.grad, ref_du, **tol(up.dtype))


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (3, 17), (17, 129), (2, 3, 129), (129, 1), (1000, 2048), (7, 3001)])
def test_forward_backward_match_reference(shape, dtype):
    assert_matches_reference(_rand(*shape, dtype=dtype, scale=2.0), _rand(*shape, dtype=dtype, seed=1))


@pytest.mark.parametrize("shape", [(3, 17), (2, 5, 129)])
def test_grads_match_autograd_through_reference_fp32(shape):
    g = _rand(*shape, scale=2.0).requires_grad_(True)
    u = _rand(*shape, seed=1).requires_grad_(True)
    dy = _rand(*shape, seed=2)
    reference.swiglu(g, u).backward(dy)
    ref = (g.grad.clone(), u.grad.clone())
    g.grad = u.grad = None
    ops.swiglu(g, u, backend="triton").backward(dy)
    torch.testing.assert_close(g.grad, ref[0], **tol(torch.float32))
    torch.testing.assert_close(u.grad, ref[1], **tol(torch.float32))


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_halves_of_a_fused_projection(dtype):
    # The usual layout: one [..., 2I] matmul output whose halves are gate and up, read in place.
    i = 129
    h = _rand(2, 17, 2 * i, dtype=dtype, scale=2.0).requires_grad_(True)
    gate, up = h[..., :i], h[..., i:]
    assert not gate.is_contiguous() and not up.is_contiguous()
    assert_matches_reference(gate, up)
    # gradients flow back into the fused tensor
    dy = _rand(2, 17, i, dtype=dtype, seed=3)
    ops.swiglu(gate, up, backend="triton").backward(dy)
    ref_dg, ref_du = reference.swiglu_backward(dy, gate.detach(), up.detach())
    torch.testing.assert_close(h.grad, torch.cat((ref_dg, ref_du), -1), **tol(dtype))


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_other_strides(dtype):
    # gate transposed (column stride > 1), up contiguous, dy permuted; leading dims that cannot merge.
    gate = _rand(129, 40, dtype=dtype, scale=2.0).t()
    up = _rand(40, 129, dtype=dtype, seed=1)
    dy = _rand(129, 40, dtype=dtype, seed=2).t()
    assert_matches_reference(gate, up, dy)
    g3 = _rand(5, 3, 33, dtype=dtype, scale=2.0).transpose(0, 1)
    u3 = _rand(3, 33, 5, dtype=dtype, seed=1).permute(0, 2, 1)
    assert_matches_reference(g3, u3)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, under the interpreter
def test_large_magnitudes_stay_finite():
    # silu saturates: exp(-g) overflows to inf for very negative g, which must give 0, not NaN.
    gate = torch.tensor([[-1000.0, -100.0, -20.0, 0.0, 20.0, 100.0, 1000.0]], device=DEV)
    up = torch.full_like(gate, 0.5)
    assert_matches_reference(gate, up, dy=torch.ones_like(gate))
    assert torch.isfinite(ops.swiglu(gate, up, backend="triton")).all()


def test_empty():
    g = _rand(0, 17).requires_grad_(True)
    u = _rand(0, 17, seed=1).requires_grad_(True)
    y = ops.swiglu(g, u, backend="triton")
    assert y.shape == (0, 17)
    y.sum().backward()
    assert g.grad.shape == (0, 17) and u.grad.shape == (0, 17)


def test_errors_name_the_argument():
    g = _rand(3, 17)
    with pytest.raises(ValueError, match=r"swiglu: up must have shape \[3, 17\]"):
        ops.swiglu(g, _rand(3, 16), backend="triton")
    with pytest.raises(TypeError, match=r"swiglu: up must be float32"):
        ops.swiglu(g, g.half(), backend="triton")
    with pytest.raises(TypeError, match=r"swiglu: gate must be float32"):
        ops.swiglu(g.double(), g.double(), backend="triton")
    with pytest.raises(TypeError, match=r"swiglu: gate must be a torch.Tensor"):
        ops.swiglu([1.0], g, backend="triton")
    # the launcher checks too, for callers that bypass the op
    from r1kernels.triton.activation import swiglu_bwd

    with pytest.raises(ValueError, match=r"swiglu_bwd: dy must match gate"):
        swiglu_bwd(_rand(3, 16), g, g)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 17), (4096, 2048), (129, 18432), (2, 3, 129)])
def test_bf16_on_gpu(shape):
    assert_matches_reference(_rand(*shape, dtype=torch.bfloat16, scale=2.0), _rand(*shape, dtype=torch.bfloat16, seed=1))
    # halves of a fused projection
    i = shape[-1]
    h = _rand(*shape[:-1], 2 * i, dtype=torch.bfloat16, scale=2.0, seed=2)
    assert_matches_reference(h[..., :i], h[..., i:])
