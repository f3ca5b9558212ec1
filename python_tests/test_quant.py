"""FP8 block dequantisation: the Triton backend against the reference, with real e4m3 weights.

Runs on the GPU when there is one, else under the Triton interpreter; bf16 output only on the GPU (the
interpreter rounds fp32 -> bf16 by truncation).
"""
import math

import pytest
import torch
from conftest import tol

from r1kernels import ops, reference

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERP_OUT = [torch.float32, torch.float16]


def _quantised(n, k, block, seed=0):
    """A weight quantised the way DeepSeek-V3's checkpoints are: per block, scale_inv = amax / 448 and
    weight = (w / scale_inv) in float8_e4m3fn. Returns ``(weight [N, K] fp8, scale_inv [ceil(N/B), ceil(K/B)] fp32)``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(math.ceil(n / block), 1, generator=g)).repeat_interleave(block, 0)[:n]
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    padded = torch.zeros(nb * block, kb * block)
    padded[:n, :k] = w
    amax = padded.reshape(nb, block, kb, block).abs().amax(dim=(1, 3)).clamp_min(1e-4)  # [NB, KB]
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    s = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    weight = (w / s).to(torch.float8_e4m3fn)
    return weight.to(DEV), scale_inv.to(DEV)


def assert_matches_reference(weight, scale_inv, block, out_dtype):
    out = ops.fp8_block_dequant(weight, scale_inv, block, out_dtype, backend="triton")
    assert out.dtype == out_dtype and out.shape == weight.shape
    torch.testing.assert_close(out, reference.fp8_block_dequant(weight, scale_inv, block, out_dtype), **tol(out_dtype))
    return out


@pytest.mark.parametrize("out_dtype", INTERP_OUT)
@pytest.mark.parametrize(
    "n,k,block", [(300, 200, 128), (128, 256, 128), (1, 1, 128), (3, 17, 128), (129, 97, 32), (300, 200, 48), (17, 129, 1)]
)
def test_fp8_matches_reference(n, k, block, out_dtype):
    weight, scale_inv = _quantised(n, k, block)
    assert weight.dtype == torch.float8_e4m3fn
    out = assert_matches_reference(weight, scale_inv, block, out_dtype)
    assert torch.isfinite(out).all()


def test_each_block_gets_its_own_scale():
    # Distinct power-of-two scales per block, unit weights: the output shows which scale each element used.
    n, k, block = 300, 200, 128
    weight = torch.ones(n, k, device=DEV).to(torch.float8_e4m3fn)
    scale_inv = torch.tensor([[1.0, 2.0], [4.0, 8.0], [16.0, 32.0]], device=DEV)
    out = assert_matches_reference(weight, scale_inv, block, torch.float32)
    for bi, rows in enumerate((slice(0, 128), slice(128, 256), slice(256, 300))):
        for bj, cols in enumerate((slice(0, 128), slice(128, 200))):
            assert torch.all(out[rows, cols] == scale_inv[bi, bj])


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_fp8_weights(w_dtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(130, 70, generator=g).to(device=DEV, dtype=w_dtype)
    scale_inv = torch.rand(3, 2, generator=g).to(DEV) + 0.5
    assert_matches_reference(weight, scale_inv, 64, torch.float32)


def test_non_contiguous_inputs():
    weight, scale_inv = _quantised(200, 300, 128)  # viewed transposed: [300, 200] with blocks [3, 2]
    w_t, s_t = weight.t(), scale_inv.t()
    assert not w_t.is_contiguous() and not s_t.is_contiguous()
    assert_matches_reference(w_t, s_t, 128, torch.float32)
    # a column slice of a wider weight, scale_inv a slice of a wider table
    wide, wide_s = _quantised(96, 256, 32, seed=1)
    assert_matches_reference(wide[:, 64:192], wide_s[:, 2:6], 32, torch.float16)


def test_empty():
    out = ops.fp8_block_dequant(torch.zeros(0, 5, device=DEV).to(torch.float8_e4m3fn), torch.ones(0, 1, device=DEV), 128,
                                torch.float32, backend="triton")
    assert out.shape == (0, 5) and out.dtype == torch.float32


def test_errors_name_the_argument():
    weight, scale_inv = _quantised(300, 200, 128)
    with pytest.raises(ValueError, match=r"fp8_block_dequant: scale_inv must have shape \[3, 2\]"):
        ops.fp8_block_dequant(weight, scale_inv[:2], 128, torch.float32, backend="triton")
    with pytest.raises(TypeError, match=r"fp8_block_dequant: scale_inv must be float32"):
        ops.fp8_block_dequant(weight, scale_inv.half(), 128, torch.float32, backend="triton")
    with pytest.raises(ValueError, match=r"fp8_block_dequant: weight must have 2 dims"):
        ops.fp8_block_dequant(weight[None], scale_inv, 128, torch.float32, backend="triton")
    with pytest.raises(TypeError, match=r"fp8_block_dequant: weight must be float8_e4m3fn"):
        ops.fp8_block_dequant(weight.to(torch.int8), scale_inv, 128, torch.float32, backend="triton")
    with pytest.raises(TypeError, match=r"fp8_block_dequant: out_dtype must be float32"):
        ops.fp8_block_dequant(weight, scale_inv, 128, torch.float64, backend="triton")
    # the launcher checks too, for callers that bypass the op
    from r1kernels.triton.quant import fp8_block_dequant as launch

    with pytest.raises(ValueError, match=r"triton.quant.fp8_block_dequant: scale_inv must be float32 \[5, 4\]"):
        launch(weight, scale_inv, 64, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,block", [(300, 200, 128), (7168, 2048, 128), (129, 97, 32)])
def test_bf16_on_gpu(n, k, block):
    weight, scale_inv = _quantised(n, k, block)
    assert_matches_reference(weight, scale_inv, block, torch.bfloat16)
