"""SiLU(gate) * up over the merged [gate | up] projection. Reference: `martlet.layers.activation.silu_and_mul`.

`silu_and_mul_quantized` also quantizes each token's result to 8-bit codes with one fp32 scale (W8A8's
per-token activations for the down projection, `martlet.kernels.quantize`): one program per token
takes two passes over gate and up, the first for the row's largest magnitude and the second for its
codes, so the product never goes to memory in the model's dtype. Reference: SiLU * up, then
`martlet.layers.kv_cache.quantize` with fp32 scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from martlet.kernels.pdl import pdl_launch, wait_for_previous_kernel
from martlet.kernels.quantize import reciprocal_or_zero, to_codes
from martlet.layers.kv_cache import KVFormat

BLOCK = 1024


@triton.jit
def _silu_mul(x_row, offs, N, DTYPE: tl.constexpr):
    """SiLU(gate) * up of one token's columns `offs`, rounded to DTYPE and returned in fp32."""
    mask = offs < N
    gate = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + N + offs, mask=mask, other=0.0).to(tl.float32)
    # Round SiLU's result to the input dtype before the product, as the two PyTorch ops do.
    silu = (gate * tl.sigmoid(gate)).to(DTYPE).to(tl.float32)
    return (silu * up).to(DTYPE).to(tl.float32)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_xt, stride_ot, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    out = _silu_mul(x_ptr + token * stride_xt, offs, N, x_ptr.dtype.element_ty)
    tl.store(out_ptr + token * stride_ot + offs, out.to(out_ptr.dtype.element_ty), mask=offs < N)


@triton.jit
def _silu_and_mul_quantize_kernel(
    x_ptr, codes_ptr, scales_ptr, stride_xt, stride_ct, N, MAX_CODE: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0)
    x_row = x_ptr + token * stride_xt
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        amax = tl.maximum(amax, tl.abs(_silu_mul(x_row, start + offs, N, x_ptr.dtype.element_ty)))
    scale = tl.max(amax, 0) / MAX_CODE
    tl.store(scales_ptr + token, scale)
    inv = reciprocal_or_zero(scale)
    for start in range(0, N, BLOCK):
        out = _silu_mul(x_row, start + offs, N, x_ptr.dtype.element_ty)
        code = to_codes(out, inv, MAX_CODE, codes_ptr.dtype.element_ty)
        tl.store(codes_ptr + token * stride_ct + start + offs, code.to(codes_ptr.dtype.element_ty),
                 mask=start + offs < N)


def _rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        raise ValueError("silu_and_mul needs a contiguous last dimension")
    return rows


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2N] -> [..., N]."""
    n = x.shape[-1] // 2
    rows = _rows(x)
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        out_rows = out.view(-1, n)
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(n, BLOCK))](
            rows, out_rows, rows.stride(0), out_rows.stride(0), n, BLOCK=BLOCK, **pdl_launch(x.device)
        )
    return out


def silu_and_mul_quantized(x: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, 2N] -> SiLU(gate) * up in x's dtype, quantized per token: codes [T, N] in `fmt`, fp32 scales [T]."""
    n = x.shape[-1] // 2
    rows = _rows(x)
    codes = torch.empty(rows.shape[0], n, dtype=fmt.dtype, device=x.device)
    scales = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        _silu_and_mul_quantize_kernel[(rows.shape[0],)](
            rows, codes, scales, rows.stride(0), codes.stride(0), n, MAX_CODE=fmt.max_code,
            BLOCK=min(BLOCK, triton.next_power_of_2(n)), num_warps=4, **pdl_launch(x.device),
        )
    return codes, scales
