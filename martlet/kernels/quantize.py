"""8-bit quantization in kernels: rounding to int8 and e4m3 codes, per-token activation codes for W8A8,
scaling int8 W8A8's int32 sums back (`scale_sums`), and widening codes back to 16 bits (`widen`, for
the 8-bit KV cache and 8-bit weights).

References: `martlet.layers.kv_cache.quantize` (the same fp32 operations in the same order, so the
kernels and the reference give the same codes). `quantize_rows` is W8A8's dynamic activation
quantization: one fp32 scale per token, max|x| / max_code, one program per token.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from martlet.layers.kv_cache import KVFormat

# The interpreter runs no PTX: there the 8-bit codes widen with a plain conversion.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def widen(codes, dtype: tl.constexpr):
    """8-bit codes to `dtype`, exactly (a tile already in `dtype` passes through). To fp16, e4m3 has
    a paired conversion (one instruction per two codes); int8's would take one quarter-rate I2F per
    code, so instead each code c is XORed to the byte c + 128 and placed under fp16 exponent bits 0x64
    (the number 1024 + c + 128), two codes a register, and 1152 is subtracted: per two codes, a PRMT
    and a SUB, all full rate."""
    if codes.dtype != tl.int8 or dtype != tl.float16 or INTERPRETED:
        wide = codes.to(dtype)
    else:
        wide = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 u, bias;
            xor.b32 u, $2, 0x80808080;
            mov.b32 bias, 0x64806480;
            prmt.b32 $0, u, 0x64646464, 0x4140;
            prmt.b32 $1, u, 0x64646464, 0x4342;
            sub.f16x2 $0, $0, bias;
            sub.f16x2 $1, $1, bias;
            }""",
            constraints="=r,=r,r", args=[codes], dtype=tl.float16, is_pure=True, pack=4)
    return wide


@triton.jit
def reciprocal_or_zero(s):
    """1 / s, and 0 for a zero scale (an all-zero row), without dividing by zero."""
    return tl.where(s > 0, 1.0 / tl.where(s > 0, s, 1.0), 0.0)


@triton.jit
def round_to_e4m3(y):
    """fp32 y (|y| <= 448) to the nearest e4m3 value, ties to even, in exact fp32 arithmetic, so the
    conversion that follows has nothing left to round (Triton's interpreter rounds 124 to 64)."""
    a = tl.abs(y)
    # The step of a's binade, 2^(exponent - 3) for 3 mantissa bits; subnormals share the smallest normal's.
    exponent = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((exponent + 124) << 23).to(tl.float32, bitcast=True)
    per_step = ((130 - exponent) << 23).to(tl.float32, bitcast=True)  # 1 / step, exactly
    units = a * per_step
    whole = tl.floor(units)
    odd = whole - 2.0 * tl.floor(whole * 0.5)
    whole = tl.where((units - whole > 0.5) | ((units - whole == 0.5) & (odd == 1.0)), whole + 1.0, whole)
    return tl.where(y < 0, -whole * step, whole * step)


@triton.jit
def to_codes(x, inv_scale, MAX_CODE: tl.constexpr, code_dtype: tl.constexpr):
    """fp32 x times its scale's reciprocal, clamped to the code range and rounded to the nearest code
    of `code_dtype` (still fp32): int8 rounds half away from zero, e4m3 to nearest even."""
    y = tl.minimum(tl.maximum(x * inv_scale, -MAX_CODE), MAX_CODE)
    if code_dtype == tl.int8:
        return tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
    else:
        return round_to_e4m3(y)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, codes_ptr, scales_ptr, stride_x, stride_c, width, MAX_CODE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], tl.float32)
    for start in range(0, width, BLOCK):
        x = tl.load(x_row + start + offs, mask=start + offs < width, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.max(amax, 0) / MAX_CODE
    tl.store(scales_ptr + row, scale)
    inv = reciprocal_or_zero(scale)
    for start in range(0, width, BLOCK):
        mask = start + offs < width
        x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
        code = to_codes(x, inv, MAX_CODE, codes_ptr.dtype.element_ty)
        tl.store(codes_ptr + row * stride_c + start + offs, code.to(codes_ptr.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (contiguous rows) to codes [M, K] and fp32 scales [M]: `kv_cache.quantize` with fp32 scales."""
    if x.stride(-1) != 1:
        raise ValueError("quantize_rows needs rows with a contiguous last dimension")
    num_rows, width = x.shape
    codes = torch.empty(x.shape, dtype=fmt.dtype, device=x.device)
    scales = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    if num_rows:
        block = min(triton.next_power_of_2(width), 2048 if x.is_cuda else 256)
        _quantize_rows_kernel[(num_rows,)](x, codes, scales, x.stride(0), codes.stride(0), width,
                                           MAX_CODE=fmt.max_code, BLOCK=block, num_warps=4)
    return codes, scales


@triton.jit
def _scale_sums_kernel(sums_ptr, row_scales_ptr, col_scales_ptr, out_ptr, N, stride_s, stride_o,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    sums = tl.load(sums_ptr + row * stride_s + cols, mask=mask, other=0).to(tl.float32)
    out = sums * tl.load(row_scales_ptr + row) * tl.load(col_scales_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def scale_sums(sums: torch.Tensor, row_scales: torch.Tensor, col_scales: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """int32 sums [M, N] (`torch._int_mm`'s) * row_scales [M] * col_scales [N], fp32, to `dtype`: one pass
    over the sums where the PyTorch expression takes four (at b256 that was ~3 ms of a 7B step). The
    same fp32 operations in the same order as `(sums.float() * row_scales[:, None] * col_scales).to(dtype)`."""
    num_rows, n = sums.shape
    if sums.stride(1) != 1 or not row_scales.is_contiguous() or not col_scales.is_contiguous():
        raise ValueError("scale_sums needs rows with a contiguous last dimension and contiguous scales")
    out = torch.empty(num_rows, n, dtype=dtype, device=sums.device)
    if num_rows:
        block = 1024 if sums.is_cuda else 128
        _scale_sums_kernel[(num_rows, triton.cdiv(n, block))](sums, row_scales, col_scales, out, n, sums.stride(0),
                                                              out.stride(0), BLOCK=block, num_warps=4)
    return out
