"""The few-token matmul against torch.nn.functional.linear."""

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import DEVICE, assert_close, dtypes

from martlet.kernels.linear import MAX_TOKENS, SkinnyConfig, skinny_linear
from martlet.layers.activation import silu_and_mul
from martlet.layers.kv_cache import KV_FORMATS, dequantize, quantize


def random(shape, seed, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize(
    "m, n, k, config",
    [
        (1, 48, 64, SkinnyConfig(block_k=32)),  # K a multiple of the tile
        (3, 50, 100, SkinnyConfig(block_k=32)),  # ragged N and K: masked edges
        (MAX_TOKENS, 17, 70, SkinnyConfig(block_n=32, block_k=64)),  # one program wider than N
        (21, 50, 100, SkinnyConfig(block_k=32)),  # the 32-row tile, partly masked
        (7, 33, 257, None),  # default tile, K one past a tile
        (3, 50, 100, SkinnyConfig(block_k=32, split_k=2)),  # K in two slices, the second ragged
        (21, 40, 96, SkinnyConfig(block_k=32, split_k=4)),  # more slices than K has tiles: one is empty
        pytest.param(5, 12288, 4096, None, marks=pytest.mark.gpu),
        pytest.param(1, 4096, 11008, SkinnyConfig(split_k=4), marks=pytest.mark.gpu),
    ],
)
def test_skinny_linear(m, n, k, config, dtype):
    x = random((m, k), m + n, dtype)
    weight = random((n, k), k, dtype) / k**0.5
    out = skinny_linear(x, weight, config=config)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, F.linear(x.float(), weight.float()), dtype)


@pytest.mark.parametrize("dtype", dtypes())
def test_skinny_linear_bias_and_strided_rows(dtype):
    # A view with a row stride wider than K, as a slice of a larger activation is.
    x = random((4, 96), 1, dtype)[:, :80]
    weight, bias = random((40, 80), 2, dtype), random((40,), 3, dtype)
    for split_k in (1, 2):
        out = skinny_linear(x, weight, bias, config=SkinnyConfig(block_k=32, split_k=split_k))
        assert_close(out, F.linear(x.float(), weight.float(), bias.float()), dtype)


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("m, half, k, split_k", [(1, 40, 64, 1), (21, 50, 100, 1), (MAX_TOKENS, 17, 70, 1),
                                                 (3, 40, 100, 3)])
def test_skinny_linear_silu_and_mul(m, half, k, split_k, dtype):
    """The gated MLP's [gate; up] projection with SiLU(gate) * up in the epilogue (after split-K's sum)."""
    x = random((m, k), m, dtype)
    weight = random((2 * half, k), k, dtype) / k**0.5
    out = skinny_linear(x, weight, config=SkinnyConfig(block_k=32, split_k=split_k), silu_and_mul=True)
    assert out.shape == (m, half)
    assert_close(out, silu_and_mul(F.linear(x.float(), weight.float())), dtype)


def test_skinny_linear_refuses_what_it_cannot_do():
    weight = torch.zeros(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="at most"):
        skinny_linear(torch.zeros(MAX_TOKENS + 1, 16, device=DEVICE), weight)
    with pytest.raises(ValueError, match="does not fit"):
        skinny_linear(torch.zeros(2, 15, device=DEVICE), weight)
    with pytest.raises(ValueError, match="even height"):
        skinny_linear(torch.zeros(2, 16, device=DEVICE), torch.zeros(7, 16, device=DEVICE), silu_and_mul=True)
    with pytest.raises(ValueError, match="x's dtype"):
        skinny_linear(torch.zeros(2, 16, device=DEVICE, dtype=torch.float16), weight)
    with pytest.raises(ValueError, match="weight_scale"):
        skinny_linear(torch.zeros(2, 16, device=DEVICE), weight.to(torch.int8))
    assert skinny_linear(torch.zeros(0, 16, device=DEVICE), weight).shape == (0, 8)


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize(
    "m, n, k, silu, split_k",
    [(1, 48, 64, False, 1), (3, 50, 100, False, 1), (21, 17, 70, False, 1), (5, 2 * 19, 96, True, 1),
     (5, 2 * 19, 96, True, 2)],
)
def test_skinny_linear_8bit_codes(m, n, k, silu, split_k, fmt, dtype):
    """W8A8's weights (int8 or e4m3 codes, an fp32 scale per output feature) against activations in x's
    dtype: odd shapes, masked edges, the SiLU-gated form, split-K."""
    codes, scales = quantize(random((n, k), k, torch.float32).cpu(), KV_FORMATS[fmt], torch.float32)
    x = random((m, k), m, dtype)
    out = skinny_linear(x, codes.to(DEVICE), config=SkinnyConfig(block_k=32, split_k=split_k), silu_and_mul=silu,
                        weight_scale=scales.to(DEVICE))
    expected = F.linear(x.float(), dequantize(codes, scales).to(DEVICE))
    assert_close(out, silu_and_mul(expected) if silu else expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [3, 16, 24, 40])  # fused, fused at the limit, 32-row tile then SiLU, cuBLAS then SiLU
def test_silu_gate_up_linear_every_path(m):
    from martlet.layers.linear import SiluGateUpLinear

    layer = SiluGateUpLinear(256, 2 * 96).to("cuda", torch.float16)
    layer.weight.data.copy_(random((2 * 96, 256), 1, torch.float16))  # created empty, as before loading
    x = random((m, 256), m, torch.float16)
    expected = silu_and_mul(F.linear(x.float(), layer.weight.float()))
    assert_close(layer(x), expected, torch.float16)
