"""Rotary embedding: the Triton backend against the reference (both layouts, 3-D and 4-D, forward and
backward), and the reference against independent formulations (complex rotation, rotate-half).

Runs on the GPU when there is one, else under the Triton interpreter; bf16 only on the GPU.
"""
import pytest
import torch
from conftest import tol

from r1kernels import ops, reference

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERP_DTYPES = [torch.float32, torch.float16]
LAYOUTS = [True, False]  # interleaved, half-split


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)


def _yarn(dim=64):
    """DeepSeek-V3's YaRN table for a rotary dim (factor 40, original context 4096)."""
    return reference.rope_inv_freq(
        dim, 10000, scaling_type="yarn", factor=40, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0
    )


def _cos_sin(positions, dim=64):
    return reference.rope_cos_sin(positions.to(DEV), *_yarn(dim))


def _positions(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 160_000, shape, generator=g)  # beyond the original 4096: the YaRN range


def assert_matches_reference(x, cos, sin, interleaved, dy=None):
    """Triton forward and backward (autograd) against the reference, and torch autograd through it."""
    dy = _rand(*x.shape, dtype=x.dtype, seed=9) if dy is None else dy
    xt = x.detach().requires_grad_(True)
    y = ops.apply_rope(xt, cos, sin, interleaved=interleaved, backend="triton")
    y.backward(dy)
    xr = x.detach().requires_grad_(True)
    y_ref = reference.apply_rope(xr, cos, sin, interleaved)
    y_ref.backward(dy)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, **tol(x.dtype))
    torch.testing.assert_close(xt.grad, xr.grad, **tol(x.dtype))


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("interleaved", LAYOUTS)
@pytest.mark.parametrize("t,h,d", [(1, 1, 64), (3, 3, 64), (17, 16, 64), (129, 1, 64), (1000, 16, 64), (17, 3, 34), (3, 2, 2)])
def test_3d_matches_reference(t, h, d, interleaved, dtype):
    x = _rand(t, h, d, dtype=dtype)
    cos, sin = _cos_sin(_positions(t), d)
    assert_matches_reference(x, cos, sin, interleaved)


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("interleaved", LAYOUTS)
@pytest.mark.parametrize("b,s,h,d", [(1, 1, 1, 64), (3, 17, 3, 64), (2, 129, 16, 64), (2, 5, 3, 6)])
def test_4d_matches_reference_per_batch_and_broadcast(b, s, h, d, interleaved, dtype):
    x = _rand(b, s, h, d, dtype=dtype)
    cos, sin = _cos_sin(_positions(b, s), d)  # [B, S, P]: each sequence its own positions
    assert_matches_reference(x, cos, sin, interleaved)
    cos_s, sin_s = _cos_sin(torch.arange(s) + 4000, d)  # [S, P]: shared by the batch
    assert_matches_reference(x, cos_s, sin_s, interleaved)


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("interleaved", LAYOUTS)
def test_non_contiguous_inputs(interleaved, dtype):
    t, h = 17, 3
    cos, sin = _cos_sin(_positions(t))
    # [H, T, D] transposed to [T, H, D]
    assert_matches_reference(_rand(h, t, 64, dtype=dtype).transpose(0, 1), cos, sin, interleaved)
    # the rope part of a wider per-head vector (MLA's q: 128 nope + 64 rope channels)
    q = _rand(t, h, 192, dtype=dtype, seed=1)
    x = q[..., 128:]
    assert not x.is_contiguous()
    assert_matches_reference(x, cos, sin, interleaved)
    # channels with stride 2, cos / sin transposed in memory, dy permuted
    x = _rand(t, h, 128, dtype=dtype, seed=2)[..., ::2]
    cos_t, sin_t = cos.t().contiguous().t(), sin.t().contiguous().t()
    assert not cos_t.is_contiguous()
    dy = _rand(64, h, t, dtype=dtype, seed=3).permute(2, 1, 0)
    assert_matches_reference(x, cos_t, sin_t, interleaved, dy=dy)
    # cos and sin with different strides from each other
    assert_matches_reference(x, cos, sin_t, interleaved)
    assert_matches_reference(x, cos_t, sin, interleaved)
    # 4-D [B, S, H, D] made from [B, H, S, D]
    b, s = 2, 17
    cos4, sin4 = _cos_sin(_positions(b, s, seed=4))
    assert_matches_reference(_rand(b, h, s, 64, dtype=dtype, seed=5).transpose(1, 2), cos4, sin4, interleaved)


@pytest.mark.parametrize("interleaved", LAYOUTS)
def test_backward_is_the_inverse_rotation(interleaved):
    # Rotations are orthogonal: the gradient of sum(y * y) / 2 is x (with attention factor 1).
    x = _rand(17, 3, 64).requires_grad_(True)
    cos, sin = reference.rope_cos_sin(_positions(17).to(DEV), *reference.rope_inv_freq(64, 10000))
    y = ops.apply_rope(x, cos, sin, interleaved=interleaved, backend="triton")
    (y * y).sum().div(2).backward()
    torch.testing.assert_close(x.grad, x.detach(), **tol(torch.float32))


def test_reference_interleaved_is_a_complex_rotation():
    # DeepSeek's own formulation: view pairs (2i, 2i+1) as complex numbers and multiply by a unit phasor
    # (scaled by YaRN's attention factor), computed here from positions and inverse frequencies directly.
    t, h = 33, 4
    x = _rand(t, h, 64)
    pos = _positions(t).to(DEV)
    inv_freq, attn = _yarn(64)
    angles = torch.outer(pos.float(), inv_freq.to(DEV))  # [T, P], fp32 as in DeepSeek's precompute_freqs_cis
    phasor = torch.polar(torch.full_like(angles, attn), angles)  # [T, P] complex64
    xc = torch.view_as_complex(x.reshape(t, h, 32, 2).contiguous())
    expected = torch.view_as_real(xc * phasor[:, None, :]).reshape(t, h, 64)
    cos, sin = reference.rope_cos_sin(pos, inv_freq, attn)
    torch.testing.assert_close(reference.apply_rope(x, cos, sin, True), expected, **tol(torch.float32))
    torch.testing.assert_close(ops.apply_rope(x, cos, sin, backend="triton"), expected, **tol(torch.float32))


def test_reference_half_split_is_rotate_half():
    # GPT-NeoX / Llama's formulation: x * cos + rotate_half(x) * sin with cos / sin repeated over both halves.
    t, h = 33, 4
    x = _rand(t, h, 64)
    cos, sin = _cos_sin(_positions(t))
    c, s = torch.cat((cos, cos), -1)[:, None, :], torch.cat((sin, sin), -1)[:, None, :]
    rotate_half = torch.cat((-x[..., 32:], x[..., :32]), -1)
    expected = x * c + rotate_half * s
    torch.testing.assert_close(reference.apply_rope(x, cos, sin, False), expected, **tol(torch.float32))
    torch.testing.assert_close(ops.apply_rope(x, cos, sin, interleaved=False, backend="triton"), expected, **tol(torch.float32))


def test_errors_name_the_argument():
    x = _rand(3, 2, 64)
    cos, sin = _cos_sin(_positions(3))
    with pytest.raises(ValueError, match=r"apply_rope: the last dim of x must be even"):
        ops.apply_rope(_rand(3, 2, 63), cos, sin, backend="triton")
    with pytest.raises(ValueError, match=r"apply_rope: x must have 3 or 4 dims"):
        ops.apply_rope(x[0], cos, sin, backend="triton")
    with pytest.raises(ValueError, match=r"apply_rope: cos must have shape \[3, 32\]"):
        ops.apply_rope(x, cos[:2], sin, backend="triton")
    with pytest.raises(ValueError, match=r"apply_rope: sin must have shape"):
        ops.apply_rope(x, cos, sin[:, :31], backend="triton")
    with pytest.raises(TypeError, match=r"apply_rope: sin must be float32"):
        ops.apply_rope(x, cos, sin.half(), backend="triton")
    with pytest.raises(TypeError, match=r"apply_rope: x must be float32"):
        ops.apply_rope(x.double(), cos, sin, backend="triton")
    # the launcher checks too, for callers that bypass the op
    from r1kernels.triton.rope import apply_rope as launch

    with pytest.raises(ValueError, match=r"triton.rope.apply_rope: cos must have shape \[3, 32\]"):
        launch(x, cos[None], sin)


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 17, 3, 64), (4, 1024, 128, 64), (4099, 16, 64)])
def test_bf16_on_gpu(shape, interleaved):
    x = _rand(*shape, dtype=torch.bfloat16)
    cos, sin = _cos_sin(_positions(*shape[:-2]))
    assert_matches_reference(x, cos, sin, interleaved)
    if x.dim() == 4:
        cos_s, sin_s = _cos_sin(torch.arange(shape[1]))
        assert_matches_reference(x, cos_s, sin_s, interleaved)
