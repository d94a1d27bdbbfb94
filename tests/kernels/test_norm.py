"""RMSNorm (plain, residual-fused, per-head) against martlet.layers.norm.rms_norm."""

import pytest
import torch
from kernel_helpers import DEVICE, assert_close, assert_codes_close, dtypes

from martlet.kernels.norm import rms_norm, rms_norm_quantized
from martlet.layers.kv_cache import KV_FORMATS, quantize
from martlet.layers.norm import rms_norm as rms_norm_reference

gpu = pytest.mark.gpu
SHAPES = [(5, 64), (7, 80), (3, 1000), pytest.param((300, 4096), marks=gpu), pytest.param((2, 8192), marks=gpu)]


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype).to(DEVICE)
    return x, weight


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(shape, dtype):
    x, weight = _inputs(shape, dtype)
    assert_close(rms_norm(x, weight, 1e-6), rms_norm_reference(x.float(), weight.float(), 1e-6), dtype)


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_add_rms_norm(shape, dtype):
    x, weight = _inputs(shape, dtype)
    residual, _ = _inputs(shape, dtype, seed=1)
    expected_sum = x + residual
    out = rms_norm(x, weight, 1e-5, residual=residual)
    assert torch.equal(residual, expected_sum)  # in place, and in x's dtype, exactly as PyTorch adds
    assert_close(out, rms_norm_reference(expected_sum.float(), weight.float(), 1e-5), dtype)


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("num_heads, head_dim", [(4, 64), (3, 80), pytest.param(32, 128, marks=gpu)])
def test_per_head_norm_of_a_strided_view(num_heads, head_dim, dtype):
    """Qwen3's QK norm: q is a [T, H, D] view into the merged QKV output, normalized per head."""
    qkv, weight = _inputs((9, 2 * num_heads * head_dim), dtype)
    q = qkv[:, : num_heads * head_dim].view(9, num_heads, head_dim)
    weight = weight[:head_dim].contiguous()
    assert_close(rms_norm(q, weight, 1e-6), rms_norm_reference(q.float(), weight.float(), 1e-6), dtype)



@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 64), (3, 1000), pytest.param((300, 4096), marks=gpu)])
def test_fused_add_rms_norm_quantized(shape, dtype, fmt):
    """W8A8's input: the norm of residual + x, quantized per token, against the norm then `quantize`."""
    x, weight = _inputs(shape, dtype)
    residual, _ = _inputs(shape, dtype, seed=1)
    x[0] = -residual[0]  # a zero row: scale 0, codes 0
    expected_sum = x + residual
    codes, scales = rms_norm_quantized(x, weight, 1e-5, KV_FORMATS[fmt], residual=residual)
    assert torch.equal(residual, expected_sum)
    normed = rms_norm_reference(expected_sum.cpu(), weight.cpu(), 1e-5)
    assert_codes_close(codes, scales, *quantize(normed, KV_FORMATS[fmt], torch.float32), ulps=1e-3)
