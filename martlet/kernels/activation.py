"""SiLU(gate) * up over the merged [gate | up] projection. Reference: `martlet.layers.activation.silu_and_mul`.

W8A8's down projection quantizes this result afterwards (`quantize_rows`): a kernel that quantized
inside (a program per token, two passes for the row's absmax) ran 0.5-0.7x as fast as the two at 16
to 256 tokens on an H200 (benchmarks/results/w8a8-H200-2026-12-02.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from martlet.kernels.pdl import pdl_launch, wait_for_previous_kernel

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_xt, stride_ot, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(x_ptr + token * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + token * stride_xt + N + offs, mask=mask, other=0.0).to(tl.float32)
    # Round SiLU's result to the input dtype before the product, as the two PyTorch ops do.
    silu = (gate * tl.sigmoid(gate)).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + token * stride_ot + offs, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2N] -> [..., N]."""
    n = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * n)
    if rows.stride(-1) != 1:
        raise ValueError("silu_and_mul needs a contiguous last dimension")
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        out_rows = out.view(-1, n)
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(n, BLOCK))](
            rows, out_rows, rows.stride(0), out_rows.stride(0), n, BLOCK=BLOCK, **pdl_launch(x.device)
        )
    return out
