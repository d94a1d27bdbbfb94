"""Per-token activation quantization (W8A8) against `kv_cache.quantize` with fp32 scales, and the int8
product's scaling back."""

import pytest
import torch
from kernel_helpers import DEVICE, ON_GPU, assert_codes_close

from martlet.kernels.quantize import quantize_rows, scale_sums
from martlet.layers.kv_cache import KV_FORMATS, quantize


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_rows, width", [(1, 7), (5, 576), (3, 1000), (2, 2500)])  # one and several chunks
def test_quantize_rows_matches_reference(fmt, dtype, num_rows, width):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(num_rows, width, generator=gen) * torch.logspace(-2, 2, num_rows)[:, None]).to(dtype)
    x[0, : width // 2] = 0.0
    if num_rows > 1:
        x[1] = 0.0  # a zero row: scale 0, codes 0
    codes, scales = quantize_rows(x.to(DEVICE), KV_FORMATS[fmt])
    ref_codes, ref_scales = quantize(x, KV_FORMATS[fmt], torch.float32)
    assert codes.dtype == KV_FORMATS[fmt].dtype and scales.dtype == torch.float32
    if ON_GPU:  # fast division may move a code by a step
        assert_codes_close(codes, scales, ref_codes, ref_scales)
    else:
        assert torch.equal(scales, ref_scales) and torch.equal(codes.float(), ref_codes.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("num_rows, n", [(1, 7), (3, 1000), (5, 2500)])  # one and several column blocks
def test_scale_sums_is_the_pytorch_expression(dtype, num_rows, n):
    gen = torch.Generator().manual_seed(0)
    padded = torch.randint(-(2**20), 2**20, (num_rows + 2, n), generator=gen, dtype=torch.int32)
    sums = padded[:num_rows]  # as the engine passes _int_mm's padded result
    row_scales, col_scales = torch.rand(num_rows, generator=gen) / 100, torch.rand(n, generator=gen) / 100
    out = scale_sums(sums.to(DEVICE), row_scales.to(DEVICE), col_scales.to(DEVICE), dtype)
    assert out.dtype == dtype
    assert torch.equal(out.cpu(), (sums.float() * row_scales[:, None] * col_scales).to(dtype))
