"""The packed-weight matmul and dequantize kernels against the PyTorch reference."""

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import DEVICE, assert_close, dtypes

from martlet.kernels.quant_linear import MAX_TOKENS, QuantLinearConfig, dequantize, quant_linear
from martlet.layers.activation import silu_and_mul
from martlet.layers.quantization import packed
from martlet.layers.quantization.packed import PackedFormat

INT8 = PackedFormat(8, 0, False)  # group_size 0: one group per row, filled in by `packed_weight`
INT4 = PackedFormat(4, 64, True)
FORMATS = {
    "int8_channel": INT8,
    "int4_g64_asym": INT4,
    "int4_g32_sym": PackedFormat(4, 32, False),  # GGUF Q4_0
    "int8_g16_sym": PackedFormat(8, 16, False),  # GGUF Q6_K, widened
    "int8_g64_sym": PackedFormat(8, 64, False),  # 8-bit GPTQ-like: the tensor-core kernel takes a group a step
}


def packed_weight(n: int, k: int, fmt: PackedFormat, dtype: torch.dtype, seed: int = 0):
    if fmt.group_size == 0:
        fmt = PackedFormat(fmt.bits, k, fmt.asymmetric)
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    qweight, scales, offsets = packed.quantize(weight, fmt, dtype)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(qweight), to(scales), to(offsets), fmt


def random(shape, seed, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def reference(x, qweight, scales, offsets, fmt, bias=None):
    weight = packed.dequantize(qweight.cpu(), scales.cpu().float(), None if offsets is None else offsets.cpu().float(),
                               fmt)
    return F.linear(x.cpu().float(), weight, None if bias is None else bias.cpu().float())


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize(
    "m, n, k, config",
    [
        (1, 48, 128, None),  # FMA kernel: one partial K tile
        (3, 50, 320, QuantLinearConfig(4, 32, 128, 4, 2)),  # FMA kernel: ragged N and K, groups straddle tiles
        (2, 64, 512, QuantLinearConfig(2, 32, 256, 4, 2)),  # FMA kernel, tiles that fit exactly: no masks
        (1, 50, 320, QuantLinearConfig(1, 32, 128, 4, 2, split_k=2)),  # K in two slices, the second ragged
        (3, 64, 512, QuantLinearConfig(4, 32, 128, 4, 2, split_k=3)),  # slices of whole steps: the last is short
        pytest.param(1, 4096, 11008, QuantLinearConfig(1, 8, 512, 4, 3, split_k=2), marks=pytest.mark.gpu),  # down
        (5, 50, 320, QuantLinearConfig(16, 32, 128, 4, 2)),  # tensor cores: ragged N, K ends mid-tile
        (6, 64, 512, QuantLinearConfig(16, 32, 256, 4, 2)),  # tensor cores, tiles that fit exactly
        (9, 50, 320, QuantLinearConfig(16, 32, 128, 4, 2, split_k=2)),  # tensor cores, K in two slices, ragged
        (6, 64, 512, QuantLinearConfig(16, 32, 128, 4, 2, split_k=3)),  # tensor cores, the last slice short
        (21, 17, 192, QuantLinearConfig(32, 32, 128, 4, 2)),  # 32-row tile, N below one block
        (70, 40, 256, QuantLinearConfig(32, 32, 128, 4, 2)),  # beyond MAX_TOKENS: three row tiles
        (40, 64, 256, QuantLinearConfig(64, 64, 128, 4, 2)),  # a GEMM-sized tile, rows ending inside it
        (32, 24, 256, None),  # the default 32-row tile
    ],
)
def test_quant_linear(m, n, k, config, name, dtype):
    qweight, scales, offsets, fmt = packed_weight(n, k, FORMATS[name], dtype)
    x, bias = random((m, k), m, dtype), random((n,), n, dtype)
    out = quant_linear(x, qweight, scales, offsets, fmt, bias, config=config)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out.cpu(), reference(x, qweight, scales, offsets, fmt, bias), dtype)


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("name", ["int8_channel", "int4_g64_asym"])
@pytest.mark.parametrize("m", [3, 9])  # the FMA kernel, tensor cores
def test_quant_linear_silu_and_mul(m, name, dtype):
    half, k = 40, 192
    qweight, scales, offsets, fmt = packed_weight(2 * half, k, FORMATS[name], dtype)
    x = random((m, k), 1, dtype)
    expected = silu_and_mul(reference(x, qweight, scales, offsets, fmt))
    out = quant_linear(x, qweight, scales, offsets, fmt, silu_and_mul=True)
    assert out.shape == (m, half)
    assert_close(out.cpu(), expected, dtype)
    # K split in two: the up rows' sums go through the reduce kernel too
    tile = QuantLinearConfig(4, 32, 64, 4, 2, split_k=2) if m <= 4 else QuantLinearConfig(16, 32, 64, 4, 2, split_k=2)
    split = quant_linear(x, qweight, scales, offsets, fmt, silu_and_mul=True, config=tile)
    assert_close(split.cpu(), expected, dtype)


@pytest.mark.parametrize("name", ["int8_channel", "int4_g64_asym"])
@pytest.mark.parametrize("m, n, k, silu", [
    (1, 32, 4224, False),  # a narrow N over a long K: split in 4 (int4)
    (3, 32, 4224, False),  # the same at a few tokens: split in 2 (int8)
    (3, 4160, 64, False),  # a wide N at a few tokens: the tensor-core tile (int8)
    (1, 4160, 64, True),  # a wide gated N at one token
    (9, 32, 4224, False),  # 5-16 tokens: tensor cores, K split in 4 (int4)
    (9, 4160, 64, True),  # gated, K split in 2 (int4): one group, so the second slice is empty
])
def test_default_tiles_of_the_7b_shape_classes(m, n, k, silu, name):
    """The tiles `quant_linear_config` picks by N and K's size, at sizes the interpreter runs."""
    qweight, scales, offsets, fmt = packed_weight(n, k, FORMATS[name], torch.float32)
    x = random((m, k), m, torch.float32)
    expected = reference(x, qweight, scales, offsets, fmt)
    expected = silu_and_mul(expected) if silu else expected
    assert_close(quant_linear(x, qweight, scales, offsets, fmt, silu_and_mul=silu).cpu(), expected, torch.float32)


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("name", FORMATS)
def test_dequantize(name, dtype):
    qweight, scales, offsets, fmt = packed_weight(40, 320, FORMATS[name], dtype)
    expected = packed.dequantize(qweight.cpu(), scales.cpu(), None if offsets is None else offsets.cpu(), fmt)
    torch.testing.assert_close(dequantize(qweight, scales, offsets, fmt).cpu(), expected)  # to an ulp or so: FMA or not


def test_quant_linear_refuses_what_it_cannot_do():
    qweight, scales, offsets, fmt = packed_weight(8, 64, INT4, torch.float32)
    with pytest.raises(ValueError, match="at most"):
        quant_linear(torch.zeros(MAX_TOKENS + 1, 64, device=DEVICE), qweight, scales, offsets, fmt)
    with pytest.raises(ValueError, match="does not fit"):
        quant_linear(torch.zeros(2, 56, device=DEVICE), qweight, scales, offsets, fmt)
    with pytest.raises(ValueError, match="only with"):
        quant_linear(torch.zeros(2, 64, device=DEVICE), qweight, scales, None, fmt)
    with pytest.raises(ValueError, match="must cover"):
        quant_linear(torch.zeros(3, 64, device=DEVICE), qweight, scales, offsets, fmt,
                     config=QuantLinearConfig(2, 32, 128, 4, 2))
    with pytest.raises(ValueError, match="split_k"):
        quant_linear(torch.zeros(40, 64, device=DEVICE), qweight, scales, offsets, fmt,
                     config=QuantLinearConfig(32, 32, 64, 4, 2, split_k=2))
    with pytest.raises(ValueError, match="group size"):
        quant_linear(torch.zeros(2, 64, device=DEVICE), qweight, scales, offsets, PackedFormat(4, 12, True))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int8_channel", "int4_g64_asym"])
@pytest.mark.parametrize("m", [1, 3, 16, 32])
def test_quant_linear_7b_shapes(m, name):
    """Llama-2-7B's qkv projection at every kernel's token counts, with the default tiles."""
    qweight, scales, offsets, fmt = packed_weight(12288, 4096, FORMATS[name], torch.float16)
    x = random((m, 4096), m, torch.float16)
    assert_close(quant_linear(x, qweight, scales, offsets, fmt).cpu(), reference(x, qweight, scales, offsets, fmt),
                 torch.float16)
