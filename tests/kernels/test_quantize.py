"""Per-token activation quantization (W8A8) against `kv_cache.quantize` with fp32 scales."""

import pytest
import torch
from kernel_helpers import DEVICE, ON_GPU, assert_codes_close

from martlet.kernels.quantize import quantize_rows
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
