"""SiLU(gate) * up against martlet.layers.activation.silu_and_mul."""

import pytest
import torch
from kernel_helpers import DEVICE, assert_close, assert_codes_close, dtypes

from martlet.kernels.activation import silu_and_mul, silu_and_mul_quantized
from martlet.layers.activation import silu_and_mul as silu_and_mul_reference
from martlet.layers.kv_cache import KV_FORMATS, quantize


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("shape", [(5, 160), (3, 3000), pytest.param((300, 2 * 14336), marks=pytest.mark.gpu)])
def test_silu_and_mul(shape, dtype):
    x = (2 * torch.randn(shape, generator=torch.Generator().manual_seed(0))).to(dtype).to(DEVICE)
    out = torch.full((shape[0], shape[1] // 2), float("nan"), dtype=dtype, device=DEVICE)
    silu_and_mul(x, out=out)
    assert_close(out, silu_and_mul_reference(x.float()), dtype)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 160), (3, 2 * 1500), pytest.param((300, 2 * 11008), marks=pytest.mark.gpu)])
def test_silu_and_mul_quantized(shape, dtype, fmt):
    """The down projection's W8A8 input: SiLU(gate) * up quantized per token, one and several chunks a row."""
    x = (2 * torch.randn(shape, generator=torch.Generator().manual_seed(0))).to(dtype)
    x[0] = 0.0  # a zero row: scale 0, codes 0
    codes, scales = silu_and_mul_quantized(x.to(DEVICE), KV_FORMATS[fmt])
    expected = quantize(silu_and_mul_reference(x), KV_FORMATS[fmt], torch.float32)
    assert_codes_close(codes, scales, *expected, ulps=1e-3)
